fn main() { eprintln!("llmproxy-metadata-center: not built yet"); std::process::exit(2) }
