"""Ollama's Go `text/template` chat templates, translated to Jinja for dmr's runners.

Ollama clients send `template` to `/api/create` in Go syntax (`{{ .System }}`,
`{{ range .Messages }}`); dmr's runners apply Jinja chat templates. This module
parses the subset of Go templates that chat templates use and writes a Jinja
template with the same output, rendered by the runner like any other:

- both kinds of Ollama template: the legacy one (`.System`, `.Prompt`,
  `.Response`), rendered once per turn with the last turn cut after
  `.Response` exactly as Ollama does, and the `.Messages` one;
- actions, `if`/`else if`/`else`, `range` (lists and maps, with `$i, $x :=`),
  `with`, variables (`$x := ...`, `$x = ...`, `$`), `break`/`continue`, pipelines,
  comments and `{{-`/`-}}` trimming;
- the functions chat templates call: `eq ne lt le gt ge and or not len index
  slice json print printf currentDate`.

Literal text is emitted as Jinja string expressions, never as raw template data,
so `trim_blocks`/`lstrip_blocks` in the runner's Jinja environment cannot change
it. Anything else (`define`, `template`, unknown functions) is refused with a
clear error instead of being guessed. Known differences from Ollama: consecutive
messages of the same role are not merged, and `json` writes Python's spacing
(`{"a": 1}`, where Go writes `{"a":1}`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = ["GoTemplateError", "go_to_jinja", "looks_like_go_template"]


class GoTemplateError(ValueError):
    """The template is not Go syntax dmr can translate; the message says where."""


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True)
class Field:
    """`.A.B` (receiver None: the dot), `$x.A`, `$.A` or `(pipeline).A`."""

    names: tuple[str, ...]
    receiver: Term | None = None


@dataclass(frozen=True)
class Variable:
    name: str  # "" is `$`, the root


@dataclass(frozen=True)
class Dot:
    pass


@dataclass(frozen=True)
class Literal:
    value: str | int | float | bool | None


@dataclass(frozen=True)
class Identifier:
    name: str  # a function


@dataclass(frozen=True)
class Pipeline:
    commands: tuple[tuple[Term, ...], ...]
    declared: tuple[str, ...] = ()
    assigns: bool = False  # `=` rather than `:=`


Term = Field | Variable | Dot | Literal | Identifier | Pipeline


@dataclass
class Text:
    text: str


@dataclass
class Action:
    pipeline: Pipeline


@dataclass
class Branch:
    """`if`, `range` or `with`; `else if` is an `if` alone in `otherwise`."""

    kind: str
    pipeline: Pipeline
    body: list[Node] = field(default_factory=list)
    otherwise: list[Node] | None = None


@dataclass
class LoopControl:
    keyword: str  # "break" | "continue"


Node = Text | Action | Branch | LoopControl


# --------------------------------------------------------------------------- lexing

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.DOTALL)
_COMMENT = re.compile(r"^\s*/\*.*\*/\s*$", re.DOTALL)
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+)
  | (?P<variable>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<dot>\.)
  | (?P<declare>:=)
  | (?P<punct>[()|=,])
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    spaced: bool  # whitespace before it: `(x).A` chains, `(x) .A` does not


def _tokens(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    spaced = True
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None:
            raise GoTemplateError(
                f"unexpected {source[position : position + 10]!r} in {{{{{source}}}}}"
            )
        kind = match.lastgroup or ""
        if kind == "space":
            spaced = True
        else:
            tokens.append(_Token(kind, match.group(), spaced))
            spaced = False
        position = match.end()
    return tokens


def _segments(source: str) -> Iterator[tuple[str, str]]:
    """("text", ...) and ("action", ...) pieces, with `{{-`/`-}}` trimming applied."""
    pieces: list[tuple[str, str]] = []
    position = 0
    trim_next = False
    for match in _ACTION.finditer(source):
        text = source[position : match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match.group(1):
            text = text.rstrip(" \t\r\n")
        pieces.append(("text", text))
        pieces.append(("action", match.group(2)))
        trim_next = bool(match.group(3))
        position = match.end()
    tail = source[position:]
    if "{{" in tail:
        raise GoTemplateError("unclosed action: '{{' without '}}'")
    pieces.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return iter(pieces)


# --------------------------------------------------------------------------- parsing


class _PipelineParser:
    def __init__(self, tokens: list[_Token], source: str) -> None:
        self.tokens = tokens
        self.position = 0
        self.source = source

    def error(self, message: str) -> GoTemplateError:
        return GoTemplateError(f"{message} in {{{{{self.source}}}}}")

    def peek(self) -> _Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise self.error("unexpected end of action")
        self.position += 1
        return token

    def pipeline(self, *, allow_declaration: bool = True, range_pair: bool = False) -> Pipeline:
        declared: list[str] = []
        assigns = False
        if allow_declaration:
            declared, assigns = self._declaration(range_pair)
        commands: list[tuple[Term, ...]] = []
        while True:
            commands.append(self._command())
            token = self.peek()
            if token is None or token.text == ")":
                break
            if token.text != "|":
                raise self.error(f"unexpected {token.text!r}")
            self.take()
        return Pipeline(tuple(commands), tuple(declared), assigns)

    def _declaration(self, range_pair: bool) -> tuple[list[str], bool]:
        start = self.position
        names: list[str] = []
        while (
            (token := self.peek()) is not None
            and token.kind == "variable"
            and "." not in token.text
        ):
            names.append(token.text[1:])
            self.take()
            following = self.peek()
            if following is not None and following.text == "," and range_pair and len(names) == 1:
                self.take()
                continue
            if following is not None and following.text in (":=", "="):
                self.take()
                return names, following.text == "="
            break
        self.position = start
        return [], False

    def _command(self) -> tuple[Term, ...]:
        terms: list[Term] = []
        while (token := self.peek()) is not None and token.text not in ("|", ")"):
            terms.append(self._term())
        if not terms:
            raise self.error("missing value")
        return tuple(terms)

    def _term(self) -> Term:
        token = self.take()
        term: Term
        if token.kind == "field":
            return Field(tuple(token.text[1:].split(".")))
        if token.kind == "variable":
            name, *fields = token.text[1:].split(".")
            variable = Variable(name)
            return Field(tuple(fields), variable) if fields else variable
        if token.kind == "dot":
            return Dot()
        if token.kind == "string":
            return Literal(str(ast.literal_eval(token.text)))
        if token.kind == "raw":
            return Literal(token.text[1:-1])
        if token.kind == "number":
            return Literal(float(token.text) if "." in token.text else int(token.text))
        if token.kind == "word":
            constants: dict[str, bool | None] = {"true": True, "false": False, "nil": None}
            if token.text in constants:
                return Literal(constants[token.text])
            return Identifier(token.text)
        if token.text == "(":
            term = self.pipeline(allow_declaration=False)
            if self.take().text != ")":
                raise self.error("missing ')'")
            chained = self.peek()
            if chained is not None and chained.kind == "field" and not chained.spaced:
                self.take()
                return Field(tuple(chained.text[1:].split(".")), term)
            return term
        raise self.error(f"unexpected {token.text!r}")


_KEYWORDS = ("if", "else", "end", "range", "with", "break", "continue")
_REFUSED = ("define", "template", "block")


def _parse(source: str) -> list[Node]:
    root: list[Node] = []
    # Open blocks: (branch, list being filled, the `else if` chain's outermost branch).
    stack: list[tuple[Branch, list[Node]]] = []
    current = root
    for kind, content in _segments(source):
        if kind == "text":
            if content:
                current.append(Text(content))
            continue
        if _COMMENT.match(content):
            continue
        tokens = _tokens(content)
        if not tokens:
            raise GoTemplateError("empty action {{}}")
        keyword = tokens[0].text if tokens[0].kind == "word" else ""
        if keyword in _REFUSED:
            raise GoTemplateError(f"'{keyword}' is not supported in chat templates")
        if keyword in ("if", "range", "with"):
            parser = _PipelineParser(tokens[1:], content)
            branch = Branch(keyword, parser.pipeline(range_pair=keyword == "range"))
            _expect_end(parser)
            current.append(branch)
            stack.append((branch, current))
            current = branch.body
        elif keyword == "else":
            if not stack:
                raise GoTemplateError("{{ else }} outside if/range/with")
            branch, _ = stack[-1]
            if branch.otherwise is not None:
                raise GoTemplateError("two {{ else }} in one block")
            branch.otherwise = []
            if len(tokens) > 1:
                if tokens[1].text != "if" or branch.kind != "if":
                    raise GoTemplateError(f"unsupported {{{{{content}}}}}")
                parser = _PipelineParser(tokens[2:], content)
                chained = Branch("if", parser.pipeline())
                _expect_end(parser)
                branch.otherwise.append(chained)
                # `else if` shares the outer `end`: replace the open block in place.
                stack[-1] = (chained, stack[-1][1])
                current = chained.body
            else:
                current = branch.otherwise
        elif keyword == "end":
            if not stack or len(tokens) > 1:
                raise GoTemplateError("unexpected {{ end }}")
            _, current = stack.pop()
        elif keyword in ("break", "continue"):
            current.append(LoopControl(keyword))
        else:
            parser = _PipelineParser(tokens, content)
            pipeline = parser.pipeline()
            _expect_end(parser)
            current.append(Action(pipeline))
    if stack:
        raise GoTemplateError(f"unclosed {{{{ {stack[-1][0].kind} }}}}: missing {{{{ end }}}}")
    return root


def _expect_end(parser: _PipelineParser) -> None:
    token = parser.peek()
    if token is not None:
        raise parser.error(f"unexpected {token.text!r}")


# --------------------------------------------------------------------------- translation

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _snake(name: str) -> str:
    return _CAMEL.sub("_", name).lower()


def _string(text: str) -> str:
    escaped = (
        text.replace("\\", "\\\\")
        .replace("'", "\\'")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f"'{escaped}'"


def _text_of(expression: str) -> str:
    """A message's content as text: OpenAI allows a list of parts where Ollama has a string."""
    return (
        f"({expression} if {expression} is string else "
        f"(({expression} or [])|selectattr('type', 'equalto', 'text')"
        f"|map(attribute='text')|join('')))"
    )


_ROOT = "<root>"


@dataclass
class _Scope:
    root_fields: dict[str, str]
    dots: list[str]
    counter: list[int] = field(default_factory=lambda: [0])

    def fresh(self, stem: str) -> str:
        self.counter[0] += 1
        return f"dmr_{stem}{self.counter[0]}"


class _Translator:
    def __init__(self, root_fields: dict[str, str]) -> None:
        self.scope = _Scope(root_fields, [_ROOT])

    # ------------------------------------------------------------------ expressions

    def field_access(self, base: str, names: Sequence[str]) -> str:
        if not names:
            return base
        expression = base
        if base == _ROOT:
            first, *names = names
            expression = self.scope.root_fields.get(first, f"{_snake(first)}")
        for name in names:
            expression = f"{expression}[{_string(_snake(name))}]"
        if names and names[-1] == "Content":
            return _text_of(expression)
        return expression

    def term(self, term: Term) -> str:
        if isinstance(term, Dot):
            dot = self.scope.dots[-1]
            if dot == _ROOT:
                raise GoTemplateError("'.' at the top of a template has no value dmr can print")
            return dot
        if isinstance(term, Variable):
            return _ROOT if term.name == "" else f"dmr_vars.v_{term.name}"
        if isinstance(term, Field):
            if term.receiver is None:
                base = self.scope.dots[-1]
            elif isinstance(term.receiver, Variable) and term.receiver.name == "":
                base = _ROOT
            else:
                base = f"({self.term(term.receiver)})"
            return self.field_access(base, term.names)
        if isinstance(term, Literal):
            if isinstance(term.value, str):
                return _string(term.value)
            if term.value is None:
                return "none"
            if isinstance(term.value, bool):
                return "true" if term.value else "false"
            return repr(term.value)
        if isinstance(term, Identifier):
            return self.call(term.name, [])
        return f"({self.pipeline(term)})"

    def pipeline(self, pipeline: Pipeline) -> str:
        previous: str | None = None
        for command in pipeline.commands:
            head, *rest = command
            arguments = [self.term(argument) for argument in rest]
            if previous is not None:
                arguments.append(previous)
            if isinstance(head, Identifier):
                previous = self.call(head.name, arguments, rest)
            elif arguments:
                raise GoTemplateError("can't give arguments to a value that is not a function")
            else:
                previous = self.term(head)
        assert previous is not None
        if previous == _ROOT:
            raise GoTemplateError("'$' alone has no value dmr can print")
        return previous

    def call(self, name: str, arguments: list[str], terms: Sequence[Term] = ()) -> str:
        comparisons = {"ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
        if name == "eq":
            _arity(name, arguments, 2, None)
            first, *others = arguments
            return "(" + " or ".join(f"{first} == {other}" for other in others) + ")"
        if name in comparisons:
            _arity(name, arguments, 2, 2)
            return f"({arguments[0]} {comparisons[name]} {arguments[1]})"
        if name in ("and", "or"):
            _arity(name, arguments, 1, None)
            return "(" + f" {name} ".join(arguments) + ")"
        if name == "not":
            _arity(name, arguments, 1, 1)
            return f"(not {arguments[0]})"
        if name == "len":
            _arity(name, arguments, 1, 1)
            return f"({arguments[0]}|length)"
        if name == "index":
            _arity(name, arguments, 1, None)
            return arguments[0] + "".join(f"[{key}]" for key in arguments[1:])
        if name == "slice":
            _arity(name, arguments, 1, 3)
            bounds = ":".join(arguments[1:3]) if len(arguments) > 2 else f"{arguments[1]}:"
            return f"{arguments[0]}[{bounds}]" if len(arguments) > 1 else arguments[0]
        if name == "json":
            _arity(name, arguments, 1, 1)
            value = arguments[0]
            names = terms[0].names if terms and isinstance(terms[0], Field) else ()
            if names and names[-1] == "Arguments":
                # Tool-call arguments are already a JSON string in OpenAI's message shape.
                return f"({value} if {value} is string else ({value}|tojson))"
            return f"({value}|tojson)"
        if name == "print":
            return "(" + " ~ ".join(arguments or ["''"]) + ")"
        if name == "printf":
            _arity(name, arguments, 1, None)
            form, *values = arguments
            return f"({form.replace('%v', '%s')}|format({', '.join(values)}))"
        if name == "currentDate":
            _arity(name, arguments, 0, 0)
            return "strftime_now('%Y-%m-%d')"
        raise GoTemplateError(f"function {name!r} is not supported in chat templates")

    # ------------------------------------------------------------------ statements

    def nodes(self, nodes: Sequence[Node]) -> str:
        return "".join(self.node(node) for node in nodes)

    def node(self, node: Node) -> str:
        if isinstance(node, Text):
            return "{{ " + _string(node.text) + " }}"
        if isinstance(node, LoopControl):
            return "{% " + node.keyword + " %}"
        if isinstance(node, Action):
            return self.action(node.pipeline)
        if node.kind == "if":
            return self.if_block(node)
        if node.kind == "with":
            return self.with_block(node)
        return self.range_block(node)

    def declare(self, names: Sequence[str], values: Sequence[str]) -> str:
        return "".join(
            "{% set dmr_vars.v_" + name + " = " + value + " %}"
            for name, value in zip(names, values, strict=True)
        )

    def action(self, pipeline: Pipeline) -> str:
        value = self.pipeline(pipeline)
        if pipeline.declared:
            if len(pipeline.declared) != 1:
                raise GoTemplateError("only range declares two variables")
            return self.declare(pipeline.declared, [value])
        # Ollama's tool types print as JSON (their String methods); nil prints nothing.
        printed = (
            f"({value}|tojson) if {value} is mapping else ({value} if {value} is not none else '')"
        )
        return "{{ " + printed + " }}"

    def if_block(self, node: Branch) -> str:
        condition = self.condition(node.pipeline)
        out = "{% if " + condition + " %}" + self.nodes(node.body)
        otherwise = node.otherwise
        while otherwise is not None:
            if (
                len(otherwise) == 1
                and isinstance(otherwise[0], Branch)
                and otherwise[0].kind == "if"
            ):
                chained = otherwise[0]
                out += "{% elif " + self.condition(chained.pipeline) + " %}"
                out += self.nodes(chained.body)
                otherwise = chained.otherwise
            else:
                out += "{% else %}" + self.nodes(otherwise)
                otherwise = None
        return out + "{% endif %}"

    def condition(self, pipeline: Pipeline) -> str:
        value = self.pipeline(pipeline)
        if pipeline.declared:
            raise GoTemplateError("declarations in 'if' are not supported")
        return value

    def with_block(self, node: Branch) -> str:
        value = self.pipeline(node.pipeline)
        dot = self.scope.fresh("with")
        out = "{% set " + dot + " = " + value + " %}"
        out += (
            "{% if "
            + dot
            + " %}"
            + self.declare(node.pipeline.declared, [dot][: len(node.pipeline.declared)])
        )
        self.scope.dots.append(dot)
        out += self.nodes(node.body)
        self.scope.dots.pop()
        if node.otherwise is not None:
            out += "{% else %}" + self.nodes(node.otherwise)
        return out + "{% endif %}"

    def range_block(self, node: Branch) -> str:
        collection = self.pipeline(node.pipeline)
        item = self.scope.fresh("item")
        dot = self.scope.fresh("dot")
        safe = f"({collection} or [])"
        out = (
            "{% for "
            + item
            + f" in ({safe}|dictsort if {collection} is mapping else {safe})"
            + " %}"
        )
        out += "{% set " + dot + f" = {item}[1] if {collection} is mapping else {item}" + " %}"
        declared = node.pipeline.declared
        if len(declared) == 2:
            key = f"{item}[0] if {collection} is mapping else loop.index0"
            out += self.declare(declared, [key, dot])
        elif len(declared) == 1:
            out += self.declare(declared, [dot])
        self.scope.dots.append(dot)
        out += self.nodes(node.body)
        self.scope.dots.pop()
        if node.otherwise is not None:
            out += "{% else %}" + self.nodes(node.otherwise)
        return out + "{% endfor %}"


def _arity(name: str, arguments: Sequence[str], least: int, most: int | None) -> None:
    if len(arguments) < least or (most is not None and len(arguments) > most):
        raise GoTemplateError(f"wrong number of arguments for {name!r}")


# --------------------------------------------------------------------------- the two kinds


def _mentions_messages(nodes: Sequence[Node]) -> bool:
    def terms_of(pipeline: Pipeline) -> Iterator[Term]:
        for command in pipeline.commands:
            for term in command:
                yield term
                if isinstance(term, Pipeline):
                    yield from terms_of(term)
                if isinstance(term, Field) and isinstance(term.receiver, Pipeline):
                    yield from terms_of(term.receiver)

    for node in nodes:
        pipelines: list[Pipeline] = []
        if isinstance(node, Action):
            pipelines.append(node.pipeline)
        elif isinstance(node, Branch):
            pipelines.append(node.pipeline)
            if _mentions_messages(node.body) or _mentions_messages(node.otherwise or []):
                return True
        for pipeline in pipelines:
            for term in terms_of(pipeline):
                if isinstance(term, Field) and term.names[:1] == ("Messages",):
                    return True
    return False


def _cut_after_response(nodes: Sequence[Node]) -> list[Node]:
    """Ollama's last legacy turn: every node after the first `.Response` is dropped."""
    cut = False

    def has_response(pipeline: Pipeline) -> bool:
        return any(
            isinstance(term, Field) and "Response" in term.names
            for command in pipeline.commands
            for term in command
        )

    def walk(items: Sequence[Node]) -> list[Node]:
        nonlocal cut
        kept: list[Node] = []
        for node in items:
            if cut:
                continue
            if isinstance(node, Action):
                cut = has_response(node.pipeline)
                kept.append(node)
            elif isinstance(node, Branch):
                # Conditions are not searched, only bodies (as Ollama's deleteNode).
                body = walk(node.body)
                otherwise = walk(node.otherwise) if node.otherwise is not None else None
                kept.append(Branch(node.kind, node.pipeline, body, otherwise))
            else:
                kept.append(node)
        return kept

    return walk(nodes)


_SYSTEM_OF_MESSAGES = (
    "{% set dmr_system = namespace(parts=[]) %}"
    "{% for dmr_m in messages %}{% if dmr_m['role'] == 'system' %}"
    "{% set dmr_system.parts = dmr_system.parts + [" + _text_of("dmr_m['content']") + "] %}"
    "{% endif %}{% endfor %}"
)


def _messages_template(nodes: Sequence[Node]) -> str:
    translator = _Translator(
        {
            "System": "(dmr_system.parts|join('\\n\\n'))",
            "Messages": "messages",
            "Tools": "tools",
            "Prompt": "''",
            "Response": "''",
            "Think": "(enable_thinking|default(false))",
        }
    )
    return "{% set dmr_vars = namespace() %}" + _SYSTEM_OF_MESSAGES + translator.nodes(nodes)


def _legacy_template(nodes: Sequence[Node]) -> str:
    """Ollama renders these once per (system, prompt, response) turn, the last one cut."""
    fields = {
        "System": "dmr_turn.system",
        "Prompt": "dmr_turn.prompt",
        "Response": "dmr_turn.response",
        "Tools": "tools",
        "Think": "(enable_thinking|default(false))",
    }
    full = _Translator(fields).nodes(nodes)
    last = _Translator(fields).nodes(_cut_after_response(nodes))
    reset = (
        "{% set dmr_turn.system = '' %}{% set dmr_turn.prompt = '' %}"
        "{% set dmr_turn.response = '' %}"
    )
    content = _text_of("dmr_m['content']")
    return (
        "{% set dmr_vars = namespace() %}"
        "{% set dmr_turn = namespace(system='', prompt='', response='') %}"
        "{% for dmr_m in messages %}"
        "{% if dmr_m['role'] == 'system' %}"
        "{% if dmr_turn.prompt or dmr_turn.response %}" + full + reset + "{% endif %}"
        "{% set dmr_turn.system = " + content + " %}"
        "{% elif dmr_m['role'] == 'user' %}"
        "{% if dmr_turn.response %}" + full + reset + "{% endif %}"
        "{% set dmr_turn.prompt = " + content + " %}"
        "{% elif dmr_m['role'] == 'assistant' %}"
        "{% set dmr_turn.response = " + content + " %}"
        "{% endif %}{% endfor %}" + last
    )


_GO_ACTION = re.compile(
    r"\{\{-?\s*(?:\.|\$|/\*|(?:if|range|with|end|else|define|template|block)\b)"
)


def looks_like_go_template(source: str) -> bool:
    """Go syntax and not Jinja: `{{ .Field }}`-style actions and no `{% ... %}` tags."""
    if "{%" in source:
        return False
    return _GO_ACTION.search(source) is not None


def go_to_jinja(source: str) -> str:
    """The Jinja chat template that renders what Ollama renders from `source`.

    Raises `GoTemplateError` for syntax errors and constructs dmr does not translate.
    """
    try:
        nodes = _parse(source)
    except SyntaxError as error:  # a malformed Go string literal
        raise GoTemplateError(f"bad string literal: {error.msg}") from None
    translate: Callable[[Sequence[Node]], str] = (
        _messages_template if _mentions_messages(nodes) else _legacy_template
    )
    return translate(nodes)
