//! `Chat`: rooms over one bidirectional stream each. A member's first message
//! names the room; every message sent to a room reaches every member, the sender
//! included, numbered in room order. When a member half-closes, the server
//! forwards what it still owes that member (up to the echo of its last message)
//! and ends the stream, so a piped client sees every reply before exiting.

use std::{collections::HashMap, pin::Pin, sync::Arc};

use futures::Stream;
use lattice_proto::agent::{chat_server, ChatMessage};
use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::wire::now_us;

/// Messages a slow member may fall behind before it is told it lagged.
const ROOM_BUFFER: usize = 1024;
const MAX_TEXT: usize = 16 * 1024;

#[derive(Clone, Default)]
pub struct ChatService {
    rooms: Arc<Mutex<HashMap<String, Room>>>,
}

struct Room {
    next_seq: u64,
    tx: broadcast::Sender<ChatMessage>,
}

impl ChatService {
    fn join(&self, room: &str) -> broadcast::Receiver<ChatMessage> {
        let mut rooms = self.rooms.lock();
        rooms
            .entry(room.to_string())
            .or_insert_with(|| Room {
                next_seq: 1,
                tx: broadcast::channel(ROOM_BUFFER).0,
            })
            .tx
            .subscribe()
    }

    fn post(&self, mut msg: ChatMessage) -> u64 {
        let mut rooms = self.rooms.lock();
        let Some(room) = rooms.get_mut(&msg.room) else { return 0 };
        msg.seq = room.next_seq;
        room.next_seq += 1;
        msg.sent_at_us = now_us();
        let seq = msg.seq;
        let _ = room.tx.send(msg);
        seq
    }
}

type ChatStream = Pin<Box<dyn Stream<Item = Result<ChatMessage, Status>> + Send>>;

#[tonic::async_trait]
impl chat_server::Chat for ChatService {
    type ChatStream = ChatStream;

    async fn chat(&self, request: Request<Streaming<ChatMessage>>) -> Result<Response<ChatStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let service = self.clone();
        tokio::spawn(async move {
            let first = match inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            };
            let room = if first.room.is_empty() {
                "lobby".to_string()
            } else {
                first.room.clone()
            };
            let mut members = service.join(&room);
            let mut last_mine = 0u64;
            let mut pending = Some(first);
            let mut closed = false;
            loop {
                if let Some(mut m) = pending.take() {
                    if m.text.len() > MAX_TEXT {
                        let _ = tx
                            .send(Err(Status::invalid_argument(format!(
                                "message longer than {MAX_TEXT} bytes"
                            ))))
                            .await;
                        return;
                    }
                    m.room = room.clone();
                    last_mine = service.post(m);
                }
                if closed && members.is_empty() {
                    // Half-closed and everything owed was forwarded.
                    return;
                }
                tokio::select! {
                    m = inbound.message(), if !closed => match m {
                        Ok(Some(m)) => pending = Some(m),
                        Ok(None) => closed = true,
                        Err(s) => { let _ = tx.send(Err(s)).await; return; }
                    },
                    r = members.recv() => match r {
                        Ok(m) => {
                            let seq = m.seq;
                            let mine = closed && seq >= last_mine;
                            if tx.send(Ok(m)).await.is_err() { return; }
                            if mine { return; }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx.send(Err(Status::resource_exhausted(format!("fell {n} messages behind the room")))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
