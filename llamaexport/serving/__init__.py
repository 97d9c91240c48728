"""Front ends over the runtime's Engine: the OpenAI-compatible HTTP server (`serve`; the only importer
of the ASGI stack, from the `serve` extra; `choices` builds its n choices, logprobs and tool calls) and the
terminal chat (`chat`).

Imports `runtime` and `model` (chat formats); nothing imports it but the CLI.
"""
