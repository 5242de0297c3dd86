"""`calculate_output`, a multi grader's formula: a small parser and evaluator, never eval.

The language is the guide's: numbers, the sub-graders' names, `+ - * / ^` (`^` is power,
right-associative, as in mathematics), unary minus, parentheses, and the functions
min max abs floor ceil exp sqrt log. Everything is a float, so no value grows without
bound (9^9^9^9 overflows at once); length and nesting are bounded too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_FORMULA_CHARS = 2000
MAX_DEPTH = 64


class FormulaError(ValueError):
    """A formula that does not parse or cannot be evaluated (formula_parse_error)."""


def _one(function: Callable[[float], float]) -> Callable[..., float]:
    def call(*args: float) -> float:
        if len(args) != 1:
            raise FormulaError(f"{function.__name__} takes one argument")
        return float(function(args[0]))

    call.__name__ = function.__name__
    return call


def _many(function: Callable[..., float]) -> Callable[..., float]:
    def call(*args: float) -> float:
        if not args:
            raise FormulaError(f"{function.__name__} takes at least one argument")
        return float(function(args))

    return call


FUNCTIONS: dict[str, Callable[..., float]] = {
    "min": _many(min),
    "max": _many(max),
    "abs": _one(abs),
    "floor": _one(math.floor),
    "ceil": _one(math.ceil),
    "exp": _one(math.exp),
    "sqrt": _one(math.sqrt),
    "log": _one(math.log),
}

_TOKEN = re.compile(
    r"\s*(?:(\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)|([A-Za-z_]\w*)|(.))"
)


@dataclass(frozen=True)
class Node:
    kind: str  # "num", "var", "neg", "op", "call"
    value: float | str = 0.0
    args: tuple[Node, ...] = ()


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(text):
        number, name, other = match.groups()
        if number is not None:
            tokens.append(("num", number))
        elif name is not None:
            tokens.append(("name", name))
        elif other is not None and not other.isspace():
            if other not in "+-*/^(),":
                raise FormulaError(f"unexpected character {other!r}")
            tokens.append(("op", other))
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-' unary | power; power := atom ('^' unary)?;
    atom := number | name | name '(' expr (',' expr)* ')' | '(' expr ')'"""

    def __init__(self, text: str, names: set[str]):
        self.tokens, self.at, self.names = _tokens(text), 0, names

    def parse(self) -> Node:
        node = self.expr(0)
        if self.at != len(self.tokens):
            raise FormulaError(f"unexpected {self.tokens[self.at][1]!r}")
        return node

    def peek(self) -> str | None:
        return self.tokens[self.at][1] if self.at < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        if self.at >= len(self.tokens):
            raise FormulaError("the formula ends too early")
        self.at += 1
        return self.tokens[self.at - 1]

    def expect(self, symbol: str) -> None:
        if self.take()[1] != symbol:
            raise FormulaError(f"expected {symbol!r}")

    def expr(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise FormulaError("the formula is nested too deeply")
        node = self.term(depth)
        while self.peek() in ("+", "-"):
            node = Node("op", self.take()[1], (node, self.term(depth)))
        return node

    def term(self, depth: int) -> Node:
        node = self.unary(depth)
        while self.peek() in ("*", "/"):
            node = Node("op", self.take()[1], (node, self.unary(depth)))
        return node

    def unary(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise FormulaError("the formula is nested too deeply")
        if self.peek() == "-":
            self.take()
            return Node("neg", args=(self.unary(depth + 1),))
        if self.peek() == "+":
            self.take()
            return self.unary(depth + 1)
        base = self.atom(depth)
        if self.peek() == "^":
            self.take()
            return Node("op", "^", (base, self.unary(depth + 1)))
        return base

    def atom(self, depth: int) -> Node:
        kind, text = self.take()
        if kind == "num":
            return Node("num", float(text))
        if kind == "name":
            if self.peek() == "(":
                if text not in FUNCTIONS:
                    raise FormulaError(f"unknown function {text!r}")
                self.take()
                args = [self.expr(depth + 1)]
                while self.peek() == ",":
                    self.take()
                    args.append(self.expr(depth + 1))
                self.expect(")")
                return Node("call", text, tuple(args))
            if text not in self.names:
                raise FormulaError(f"unknown name {text!r}: not one of the graders")
            return Node("var", text)
        if text == "(":
            node = self.expr(depth + 1)
            self.expect(")")
            return node
        raise FormulaError(f"unexpected {text!r}")


def parse_formula(text: str, names: set[str]) -> Node:
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"calculate_output is longer than {MAX_FORMULA_CHARS} characters")
    return _Parser(text, names).parse()


def _evaluate(node: Node, values: Mapping[str, float]) -> float:
    if node.kind == "num":
        return float(node.value)
    if node.kind == "var":
        return float(values[str(node.value)])
    if node.kind == "neg":
        return -_evaluate(node.args[0], values)
    args = [_evaluate(arg, values) for arg in node.args]
    if node.kind == "call":
        return FUNCTIONS[str(node.value)](*args)
    left, right = args
    if node.value == "+":
        return left + right
    if node.value == "-":
        return left - right
    if node.value == "*":
        return left * right
    if node.value == "/":
        return left / right
    return math.pow(left, right)


def evaluate_formula(text: str, values: Mapping[str, float]) -> float:
    """The formula's value given each sub-grader's reward; FormulaError if it does not
    parse, divides by zero, leaves the reals (sqrt(-1), log(0)) or overflows."""
    tree = parse_formula(text, set(values))
    try:
        result = _evaluate(tree, values)
    except (ZeroDivisionError, OverflowError, ValueError) as error:
        raise FormulaError(f"calculate_output cannot be evaluated: {error}") from None
    if not math.isfinite(result):
        raise FormulaError("calculate_output is not a finite number")
    return result
