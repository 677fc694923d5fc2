"""The model card's metadata block is what the Hub expects: hub ids only, relation, tags, library."""

import yaml

from mergecli.engine.card import card_metadata, hub_id, model_card


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_hub_ids_and_local_paths():
    assert hub_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_id("org/name@v1.0") == "org/name"
    assert hub_id("./ft-code") is None
    assert hub_id("/abs/path") is None
    assert hub_id("ft-code") is None


def test_merge_card_lists_hub_models_and_the_recipe():
    text = model_card("code-and-verse: ties", "org/base@main", [("code", "org/code-ft", "1"),
                                                                 ("verse", "./lora-verse", "[0, 1]")],
                      "name: code-and-verse\nbase: org/base@main\n", summary="method ties")
    meta = front_matter(text)
    assert meta == {"base_model": ["org/base", "org/code-ft"], "base_model_relation": "merge",
                    "tags": ["merge", "mergecli"], "library_name": "transformers"}
    assert "| verse | `./lora-verse` | [0, 1] |" in text
    assert "```yaml\nname: code-and-verse\nbase: org/base@main\n```" in text


def test_adapter_card_and_all_local():
    assert card_metadata("org/base", ["org/a", "org/b"], adapter=True) == {
        "base_model": ["org/base"], "base_model_relation": "adapter", "tags": ["merge", "mergecli", "lora"],
        "library_name": "peft"}
    assert card_metadata("./base", ["./a"]) == {"tags": ["merge", "mergecli"], "library_name": "transformers"}


def test_a_local_folder_shaped_like_a_hub_id_is_not_one(tmp_path):
    (tmp_path / "models" / "ft").mkdir(parents=True)
    assert hub_id("models/ft", tmp_path) is None
    assert hub_id("models/ft") == "models/ft"  # without a root it cannot tell
