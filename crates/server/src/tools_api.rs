//! The tool gateway's catalogue on both ports: `GET /v1/tools` and
//! `lattice.agent.v1.ToolCatalog/ListTools`. Both answer for the caller's tenant
//! (the one the gateway layer established): the built-in tools, the tools of the
//! MCP servers that tenant may use, with their argument schemas, and those
//! servers' state.

use axum::{extract::State, Json};
use lattice_agent::tools::ToolGateway;
use lattice_proto::agent::{
    tool_catalog_server::ToolCatalog, ListToolsRequest, ListToolsResponse, McpServerStatus, ToolDescriptor,
};
use serde_json::{json, Value};
use tonic::{Code, Request, Response, Status};

use crate::{error::ApiError, AppState};

fn gateway(s: &AppState) -> Result<ToolGateway, ApiError> {
    s.agents
        .as_ref()
        .map(|a| a.orchestrator.tools().clone())
        .ok_or_else(|| ApiError::Task {
            code: Code::Unavailable,
            message: "the agent plane is off on this server".into(),
        })
}

fn tenant_of(ctx: Option<&crate::gateway::RequestContext>) -> String {
    ctx.map_or_else(|| "default".to_string(), |c| c.tenant.clone())
}

pub async fn list(
    State(s): State<AppState>,
    ctx: Option<axum::Extension<crate::gateway::RequestContext>>,
) -> Result<Json<Value>, ApiError> {
    let tools = gateway(&s)?;
    let tenant = tenant_of(ctx.as_deref());
    Ok(Json(json!({
        "tenant": tenant,
        "tools": tools.catalogue(&tenant),
        "servers": tools.mcp().servers(&tenant),
    })))
}

/// The gRPC side, served when the agent plane is on.
pub struct Catalog {
    pub tools: ToolGateway,
}

#[tonic::async_trait]
impl ToolCatalog for Catalog {
    async fn list_tools(&self, r: Request<ListToolsRequest>) -> Result<Response<ListToolsResponse>, Status> {
        let tenant = tenant_of(r.extensions().get::<crate::gateway::RequestContext>());
        let tools = self
            .tools
            .catalogue(&tenant)
            .into_iter()
            .map(|t| ToolDescriptor {
                name: t.name,
                description: t.description,
                input_schema_json: t.input_schema.to_string(),
                source: t.source,
            })
            .collect();
        let servers = self
            .tools
            .mcp()
            .servers(&tenant)
            .into_iter()
            .map(|s| McpServerStatus {
                name: s.name,
                transport: s.transport.into(),
                state: s.state.into(),
                error: s.error,
                tools: u32::try_from(s.tools).unwrap_or(u32::MAX),
                connects: s.connects,
            })
            .collect();
        Ok(Response::new(ListToolsResponse { tools, servers }))
    }
}
