fn main() { eprintln!("llmproxy-sim: not built yet"); std::process::exit(2) }
