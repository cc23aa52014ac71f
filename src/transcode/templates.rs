//! Built-in chat templates: how chat messages become one prompt string for backends that
//! take raw text (Triton's generate endpoint).

/// A chat template, selected per rule by name (`chat_template`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>role\ncontent<|im_end|>\n` … `<|im_start|>assistant\n` (Qwen, many others).
    ChatMl,
    /// Llama 3 header tokens.
    Llama3,
    /// `role: content` lines, then `assistant:` (for tests and base models).
    Plain,
}

impl ChatTemplate {
    /// Accepted names, for error messages.
    pub const NAMES: &'static str = "chatml, llama3, plain";

    /// The template of a config name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "chatml" => Some(Self::ChatMl),
            "llama3" => Some(Self::Llama3),
            "plain" => Some(Self::Plain),
            _ => None,
        }
    }

    /// Renders `(role, text)` messages and the assistant turn opener.
    pub fn render<'a>(self, messages: impl IntoIterator<Item = (&'a str, String)>) -> String {
        let mut out = String::new();
        if self == Self::Llama3 {
            out.push_str("<|begin_of_text|>");
        }
        for (role, text) in messages {
            match self {
                Self::ChatMl => {
                    out.push_str("<|im_start|>");
                    out.push_str(role);
                    out.push('\n');
                    out.push_str(&text);
                    out.push_str("<|im_end|>\n");
                }
                Self::Llama3 => {
                    out.push_str("<|start_header_id|>");
                    out.push_str(role);
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(&text);
                    out.push_str("<|eot_id|>");
                }
                Self::Plain => {
                    out.push_str(role);
                    out.push_str(": ");
                    out.push_str(&text);
                    out.push('\n');
                }
            }
        }
        out.push_str(match self {
            Self::ChatMl => "<|im_start|>assistant\n",
            Self::Llama3 => "<|start_header_id|>assistant<|end_header_id|>\n\n",
            Self::Plain => "assistant:",
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs() -> Vec<(&'static str, String)> {
        vec![("system", "Be brief.".into()), ("user", "Hi".into())]
    }

    #[test]
    fn chatml() {
        assert_eq!(
            ChatTemplate::ChatMl.render(msgs()),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn llama3() {
        assert_eq!(
            ChatTemplate::Llama3.render(msgs()),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn plain_and_names() {
        assert_eq!(
            ChatTemplate::Plain.render(msgs()),
            "system: Be brief.\nuser: Hi\nassistant:"
        );
        assert_eq!(ChatTemplate::parse("llama3"), Some(ChatTemplate::Llama3));
        assert_eq!(ChatTemplate::parse("vicuna"), None);
    }
}
