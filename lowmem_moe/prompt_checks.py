"""Heuristics for prompts that YAML accepted but the user probably did not mean."""

# Quote characters that a YAML plain scalar keeps as part of the text.
_QUOTES = ('"', "'")


def find_prompt_slip(prompt: str) -> str | None:
    """Return why a prompt looks like a YAML slip, or None when it looks intended.

    A published recipe has ``- science"`` where ``- "science"`` was meant.
    YAML reads that as the text ``science"`` with no error, so the stray
    quote silently becomes part of the router prompt.
    """
    if prompt and not prompt.strip():
        return "contains only whitespace"

    stripped = prompt.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in _QUOTES:
        return "is wrapped in quote characters, which become part of the prompt text"
    if stripped.count('"') % 2 == 1:
        return "has an unbalanced double quote, which becomes part of the prompt text"
    if stripped[:1] == "'" and stripped[-1:] != "'":
        return "starts with a single quote that is never closed, so the quote becomes part of the prompt text"
    if '", "' in stripped or "', '" in stripped:
        return "looks like several prompts written as one string; write one prompt per '- ' line"
    return None
