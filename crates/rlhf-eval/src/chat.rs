//! Chat messages and turns: the shapes the caller turns into token ids with its chat template,
//! and the HTTP judge sends as OpenAI chat messages.

use serde::{Deserialize, Serialize};

/// Who speaks a [`ChatMessage`]; serialised lowercase as in OpenAI's and Hugging Face's chat
/// formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The system prompt.
    System,
    /// The user (an MT-Bench question).
    User,
    /// The model under test.
    Assistant,
}

impl Role {
    /// `"system"`, `"user"` or `"assistant"`: the name chat templates expect.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// Which of the two MT-Bench turns; serialised as the number `1` or `2` (FastChat's `turn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u8", try_from = "u8")]
pub enum Turn {
    /// The first question.
    First,
    /// The follow-up question.
    Second,
}

impl Turn {
    /// Both turns, in order.
    pub const ALL: [Turn; 2] = [Turn::First, Turn::Second];

    /// 0 for the first turn, 1 for the second: the index into a question's `turns`.
    pub fn index(self) -> usize {
        match self {
            Turn::First => 0,
            Turn::Second => 1,
        }
    }

    /// 1 or 2.
    pub fn number(self) -> u8 {
        match self {
            Turn::First => 1,
            Turn::Second => 2,
        }
    }
}

impl From<Turn> for u8 {
    fn from(t: Turn) -> u8 {
        t.number()
    }
}

impl TryFrom<u8> for Turn {
    type Error = String;

    fn try_from(n: u8) -> Result<Self, String> {
        match n {
            1 => Ok(Turn::First),
            2 => Ok(Turn::Second),
            other => Err(format!("turn must be 1 or 2, got {other}")),
        }
    }
}

impl std::fmt::Display for Turn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.number())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_serialises_as_number_and_rejects_others() {
        assert_eq!(serde_json::to_string(&Turn::Second).unwrap(), "2");
        assert_eq!(serde_json::from_str::<Turn>("1").unwrap(), Turn::First);
        let err = serde_json::from_str::<Turn>("3").unwrap_err().to_string();
        assert!(err.contains("turn must be 1 or 2"), "{err}");
    }

    #[test]
    fn message_serialises_like_openai() {
        let m = ChatMessage::assistant("hi");
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"role":"assistant","content":"hi"}"#
        );
    }
}
