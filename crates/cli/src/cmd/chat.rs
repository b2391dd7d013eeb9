//! `lattice chat`: a chat room from the terminal.

use clap::Args;

use crate::Failure;

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    /// Server gRPC URL.
    #[arg(long, env = "LATTICE_CHAT_SERVER", default_value = "http://127.0.0.1:8001")]
    pub server: String,
    /// Room to join.
    #[arg(long, env = "LATTICE_CHAT_ROOM", default_value = "lobby")]
    pub room: String,
    /// Name shown with your messages.
    #[arg(long, env = "LATTICE_CHAT_NAME", default_value = "anonymous")]
    pub name: String,
}

pub async fn run(args: ChatArgs) -> Result<(), Failure> {
    use lattice_proto::agent::{chat_client::ChatClient, ChatMessage};
    use tokio::io::AsyncBufReadExt;
    let mut client = ChatClient::connect(args.server.clone())
        .await
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot reach {}: {e}", args.server)))?;
    let (tx, rx) = tokio::sync::mpsc::channel::<ChatMessage>(64);
    let (room, name) = (args.room.clone(), args.name.clone());
    // Stdin is read on its own task: the reply stream keeps printing while the
    // user types. EOF (or Ctrl-D) half-closes the sending side.
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg = ChatMessage {
                room: room.clone(),
                sender: name.clone(),
                text: line,
                ..ChatMessage::default()
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut replies = client
        .chat(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|s| Failure::Runtime(anyhow::anyhow!("chat refused: {}", s.message())))?
        .into_inner();
    loop {
        match replies.message().await {
            Ok(Some(m)) => println!("[{}#{}] {}: {}", m.room, m.seq, m.sender, m.text),
            Ok(None) => return Ok(()),
            Err(s) => return Err(Failure::Runtime(anyhow::anyhow!("chat ended: {}", s.message()))),
        }
    }
}
