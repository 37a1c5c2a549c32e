"""How `dmr run` sends a chat and shows the answer: `--openaiurl`, `--color`, `--debug`.

Docker Model Runner's `run` (cmd/cli/commands/run.go):
- `--openaiurl URL` chats with any OpenAI-compatible endpoint instead of the
  runner, posting to `URL/chat/completions` (no pull, no model check, no
  `--detach`);
- `--color auto|yes|no` (default `no`) renders the answer as Markdown in colour
  (`auto`: when stdout is a terminal). DMR renders each Markdown block as it
  completes; dmr streams the answer as plain text, then, with colour on, shows
  it rendered when it is complete, so nothing is lost if the stream breaks;
- `--debug` says on stderr which model and prompt it runs, and where it sends them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

__all__ = ["COLOR_MODES", "RUNNER_CHAT_PATH", "AnswerStyle", "use_markdown"]

RUNNER_CHAT_PATH = "/engines/v1/chat/completions"
COLOR_MODES = ("auto", "yes", "no")


def use_markdown(color: str) -> bool:
    """DMR's shouldUseMarkdown: `yes`, or `auto` where colour is possible."""
    if color == "yes":
        return True
    if color == "no":
        return False
    return sys.stdout.isatty()


@dataclass(frozen=True)
class AnswerStyle:
    """Where a chat goes and how its answer is shown."""

    chat_path: str = RUNNER_CHAT_PATH
    markdown: bool = False
    debug: bool = False

    def render(self, answer: str) -> None:
        """The whole answer as rendered Markdown (colour forced: the user asked for it)."""
        if not self.markdown or not answer.strip():
            return
        from rich.console import Console
        from rich.markdown import Markdown
        from rich.rule import Rule

        console = Console(force_terminal=True)
        console.print(Rule(style="dim"))
        console.print(Markdown(answer))

    def note(self, message: str) -> None:
        if self.debug:
            print(message, file=sys.stderr, flush=True)
