//! Slack's interactive messages: the buttons we post (Approve and Reject on
//! a deployment that waits at a gate; Confirm and Cancel on a chat
//! deployment that touches more hosts than `chat.confirm-above`), and the
//! payload Slack posts to `/hooks/slack/interactive` when one is clicked
//! (a form whose `payload` field is JSON; signed like the slash command).
//!
//! A button carries what it is about in its `value`: `DEPLOYMENT:GATE` for
//! a gate (a click on an older gate's button never approves a newer one),
//! the chat request's id for a confirmation.

use serde::Deserialize;

use nix_deploy_core::approval::GateKind;

use super::notify::GateNotice;
use super::slack::SlackError;

/// What a click asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Click {
    Approve { deployment: i64, gate: u32 },
    Reject { deployment: i64, gate: u32 },
    Confirm { request: i64 },
    Cancel { request: i64 },
}

/// One click, as Slack reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interaction {
    /// Slack's user id of whoever clicked (never a display name).
    pub user_id: String,
    pub channel_id: String,
    pub response_url: Option<String>,
    pub click: Click,
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: String,
    user: Named,
    #[serde(default)]
    channel: Option<Named>,
    #[serde(default)]
    response_url: Option<String>,
    #[serde(default)]
    actions: Vec<Action>,
}

#[derive(Deserialize)]
struct Named {
    id: String,
}

#[derive(Deserialize)]
struct Action {
    action_id: String,
    #[serde(default)]
    value: String,
}

fn slack_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Read the form Slack posts for a click (signature already verified).
pub fn parse_interaction(body: &[u8]) -> Result<Interaction, SlackError> {
    let payload = form_urlencoded::parse(body)
        .find(|(key, _)| key == "payload")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| SlackError::BadForm("no `payload` field".into()))?;
    let payload: Payload =
        serde_json::from_str(&payload).map_err(|e| SlackError::BadForm(format!("payload: {e}")))?;
    if payload.kind != "block_actions" {
        return Err(SlackError::BadArgument(format!(
            "interactions of type `{}` are not handled",
            payload.kind
        )));
    }
    if !slack_id(&payload.user.id) {
        return Err(SlackError::BadForm("payload: malformed user id".into()));
    }
    let channel_id = payload.channel.map(|c| c.id).unwrap_or_default();
    if !channel_id.is_empty() && !slack_id(&channel_id) {
        return Err(SlackError::BadForm("payload: malformed channel id".into()));
    }
    let [action] = payload.actions.as_slice() else {
        return Err(SlackError::BadForm(
            "payload: expected exactly one action".into(),
        ));
    };
    let bad = || SlackError::BadArgument(format!("button value `{}` is malformed", action.value));
    let gate = || -> Result<(i64, u32), SlackError> {
        let (deployment, gate) = action.value.split_once(':').ok_or_else(bad)?;
        Ok((
            deployment.parse().map_err(|_| bad())?,
            gate.parse().map_err(|_| bad())?,
        ))
    };
    let request = || -> Result<i64, SlackError> { action.value.parse().map_err(|_| bad()) };
    let click = match action.action_id.as_str() {
        "approve" => {
            let (deployment, gate) = gate()?;
            Click::Approve { deployment, gate }
        }
        "reject" => {
            let (deployment, gate) = gate()?;
            Click::Reject { deployment, gate }
        }
        "confirm" => Click::Confirm {
            request: request()?,
        },
        "cancel" => Click::Cancel {
            request: request()?,
        },
        other => {
            return Err(SlackError::BadArgument(format!("unknown action `{other}`")));
        }
    };
    Ok(Interaction {
        user_id: payload.user.id,
        channel_id,
        response_url: payload.response_url.filter(|u| !u.is_empty()),
        click,
    })
}

fn button(label: &str, action_id: &str, value: &str, style: &str) -> serde_json::Value {
    serde_json::json!({
        "type": "button",
        "text": { "type": "plain_text", "text": label },
        "action_id": action_id,
        "value": value,
        "style": style,
    })
}

/// A gate with Approve (Promote, for a pause) and Reject buttons, and what
/// an approver is shown: the held hosts and what each would run.
pub fn gate_message(gate: &GateNotice, text: &str) -> serde_json::Value {
    let value = format!("{}:{}", gate.id, gate.gate);
    let yes = match gate.kind {
        GateKind::Approval => "Approve",
        GateKind::Pause => "Promote",
    };
    let mut detail = text.to_string();
    if !gate.summary.is_empty() {
        detail.push_str(&format!("\n```{}```", gate.summary));
    }
    serde_json::json!({
        "text": text,
        "blocks": [
            { "type": "section", "text": { "type": "mrkdwn", "text": detail } },
            { "type": "actions", "block_id": "gate", "elements": [
                button(yes, "approve", &value, "primary"),
                button("Reject", "reject", &value, "danger"),
            ] },
        ],
    })
}

/// A chat deployment's plan with Confirm and Cancel buttons.
pub fn confirm_message(request: i64, plan: &serde_json::Value, hosts: usize) -> serde_json::Value {
    let value = request.to_string();
    let text = format!(
        "{}\nThis touches {hosts} hosts: confirm to deploy.",
        plan["text"].as_str().unwrap_or_default()
    );
    serde_json::json!({
        "response_type": "in_channel",
        "text": text,
        "blocks": [
            { "type": "section", "text": { "type": "mrkdwn", "text": text } },
            { "type": "actions", "block_id": "confirm", "elements": [
                button("Confirm", "confirm", &value, "primary"),
                button("Cancel", "cancel", &value, "danger"),
            ] },
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(payload: serde_json::Value) -> Vec<u8> {
        format!(
            "payload={}",
            form_urlencoded::byte_serialize(payload.to_string().as_bytes()).collect::<String>()
        )
        .into_bytes()
    }

    fn click(action_id: &str, value: &str) -> serde_json::Value {
        serde_json::json!({
            "type": "block_actions",
            "user": { "id": "U2", "username": "bob" },
            "channel": { "id": "C1" },
            "response_url": "https://hooks.slack.com/actions/T1/1/x",
            "actions": [{ "action_id": action_id, "value": value, "type": "button" }],
        })
    }

    #[test]
    fn clicks_are_read_from_the_payload_field() {
        let i = parse_interaction(&form(click("approve", "12:2"))).unwrap();
        assert_eq!(
            i,
            Interaction {
                user_id: "U2".into(),
                channel_id: "C1".into(),
                response_url: Some("https://hooks.slack.com/actions/T1/1/x".into()),
                click: Click::Approve {
                    deployment: 12,
                    gate: 2
                },
            }
        );
        assert_eq!(
            parse_interaction(&form(click("cancel", "7")))
                .unwrap()
                .click,
            Click::Cancel { request: 7 }
        );
        for bad in [
            form(click("approve", "12")),
            form(click("confirm", "x")),
            form(click("launch", "1")),
            form(serde_json::json!({ "type": "view_submission", "user": { "id": "U2" } })),
            b"text=hello".to_vec(),
            form(
                serde_json::json!({ "type": "block_actions", "user": { "id": "U 2" },
                "actions": [{ "action_id": "confirm", "value": "1" }] }),
            ),
        ] {
            assert!(parse_interaction(&bad).is_err());
        }
    }

    #[test]
    fn buttons_carry_what_they_are_about() {
        let gate = GateNotice {
            id: 4,
            gate: 1,
            kind: GateKind::Pause,
            title: "paused after the canaries".into(),
            hosts: vec!["c2".into()],
            missing: "a promotion".into(),
            deadline: None,
            summary: "c2: a → b".into(),
        };
        let message = gate_message(&gate, "paused");
        let buttons = message["blocks"][1]["elements"].as_array().unwrap();
        assert_eq!(buttons[0]["text"]["text"], "Promote");
        assert_eq!(buttons[0]["value"], "4:1");
        assert!(
            message["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .contains("c2: a → b")
        );
        let confirm = confirm_message(9, &serde_json::json!({ "text": "*Plan*" }), 3);
        let buttons = confirm["blocks"][1]["elements"].as_array().unwrap();
        assert_eq!(buttons[0]["action_id"], "confirm");
        assert_eq!(buttons[1]["action_id"], "cancel");
        assert_eq!(buttons[1]["value"], "9");
        assert!(confirm["text"].as_str().unwrap().contains("3 hosts"));
    }
}
