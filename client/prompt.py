"""The model card's prompt, verbatim: the adapter was trained on exactly these strings."""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a clinical trial endpoint extraction system. "
    "Extract structured endpoint information from clinical trial text. "
    "Return ONLY valid JSON."
)

USER_TEMPLATE = (
    "Extract all endpoint fields from this clinical trial text. Return ONLY a JSON.\n\n"
    "Text:\n{text}\n\n"
    "Output (JSON only):"
)


def build_messages(text: str) -> list[dict[str, str]]:
    """Chat messages for one endpoint text, as the seed's training and inference used them."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_TEMPLATE.format(text=text)},
    ]
