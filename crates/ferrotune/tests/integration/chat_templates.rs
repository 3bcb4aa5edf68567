//! Chat templates of the popular families render byte-equal to transformers
//! (tests/fixtures/chat_renders.json, rendered by transformers' apply_chat_template).

use ferrotune::io::{ChatTemplate, TemplateTokens};

use crate::{fixtures, read_fixture_json};

#[test]
fn renders_equal_transformers_for_every_family() {
    let fixture = read_fixture_json("chat_renders.json");
    let cases = fixture["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 100,
        "expected the full fixture, got {} cases",
        cases.len()
    );
    let mut failures = Vec::new();
    let mut families = std::collections::BTreeSet::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        families.insert(name.to_string());
        let label = format!("{name}/{}", case["case"].as_str().unwrap());
        let source =
            std::fs::read_to_string(fixtures().join(case["template_file"].as_str().unwrap()))
                .unwrap();
        let template = ChatTemplate::new(source).unwrap_or_else(|e| panic!("{label}: {e}"));
        let tokens = TemplateTokens {
            bos_token: case["bos_token"].as_str().map(str::to_string),
            eos_token: case["eos_token"].as_str().map(str::to_string),
            ..Default::default()
        };
        // Variables beyond messages: `extra_context`, and `tools` as transformers passes it.
        let mut extra = case
            .get("extra_context")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({}));
        if let Some(tools) = case.get("tools") {
            extra["tools"] = tools.clone();
        }
        let result = template.render(
            &case["messages"],
            case["add_generation_prompt"].as_bool().unwrap(),
            &tokens,
            Some(&extra),
        );
        if case.get("error").and_then(|e| e.as_bool()) == Some(true) {
            if result.is_ok() {
                failures.push(format!("{label}: rendered but transformers raised"));
            }
            continue;
        }
        match result {
            Ok(text) if text == case["expected"].as_str().unwrap() => {}
            Ok(text) => failures.push(format!(
                "{label}:\n got {text:?}\nwant {:?}",
                case["expected"].as_str().unwrap()
            )),
            Err(e) => failures.push(format!("{label}: {e}")),
        }
    }
    assert!(families.len() >= 10, "{families:?}");
    assert!(
        failures.is_empty(),
        "{} of {} renders differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
