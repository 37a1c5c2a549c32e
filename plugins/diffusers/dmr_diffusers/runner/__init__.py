"""The diffusers runner subprocess: `python -m dmr_diffusers.runner ...`.

It loads one pipeline and serves `/health`, `/v1/models`, `/metrics` and
`POST /v1/images/generations` on a unix socket (docs/architecture.md).
"""
