"""The README's generated sections match the code they describe."""

from __future__ import annotations

from router_ext.harness import docs


def test_readme_generated_sections_are_fresh() -> None:
    text = docs.README.read_text()
    assert docs.render_readme(text) == text, (
        "README is stale: run python -m router_ext.harness.docs"
    )


def test_readme_opens_with_the_two_commands() -> None:
    lines = docs.README.read_text().splitlines()
    block = lines[lines.index("```sh") + 1 : lines.index("```sh") + 3]
    assert block[0].startswith("make demo") and block[1].startswith("make test")


def test_config_reference_covers_every_field() -> None:
    table = docs.config_reference_markdown()
    for key in (
        "scrape.interval_s",
        "routing.slow_start_s",
        "envoy.message_timeout_ms",
        "warmup.enabled",
        "router.drain_seconds",
        "discovery.pods_file",
    ):
        assert f"`{key}`" in table
    assert "| |" not in table  # every field has a description
