"""Step-by-step reasoning traces for verifiable arithmetic tasks, and the s1 SFT format.

A trace is written by evaluating the problem's expression one operation at a time, in the
order a careful person would (parentheses first, then ``*``/``/`` left to right, then ``+``/``-``
left to right); each step is one line ``a op b = c``. The result is checked against the task's
own answer, so a trace is never wrong. The number of steps grows with the expression, which
gives the curation's length criterion and the thinking budget something real to act on.

SFT format (s1): the assistant turn is ``think_start + trace + "\\n" + think_end + answer``. At
inference, budget forcing appends ``think_start`` to the prompt and controls when
``think_end`` comes, so training masks ``think_start`` out of the loss (it is prompt, not
output) and trains on the reasoning and the answer.
"""
from __future__ import annotations

import ast
import json
import operator
from fractions import Fraction

from selftaught.config import BudgetConfig

_OPS = {ast.Add: ("+", operator.add), ast.Sub: ("-", operator.sub), ast.Mult: ("*", operator.mul),
        ast.Div: ("/", operator.truediv)}  # division by zero raises ZeroDivisionError


def _fmt(v: Fraction) -> str:
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.6g}"


def arithmetic_steps(expression: str) -> tuple[list[str], Fraction]:
    """The expression's operations as lines ``a op b = c`` and its exact value."""
    tree = ast.parse(expression.strip().rstrip("=").strip(), mode="eval").body
    steps: list[str] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(node.value).limit_denominator()
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            op, fn = _OPS[type(node.op)]
            v = fn(a, b)
            steps.append(f"{_fmt(a)} {op} {_fmt(b)} = {_fmt(v)}")
            return v
        raise ValueError(f"unsupported expression element {ast.dump(node)[:60]}")

    value = ev(tree)
    if not steps:
        steps.append(f"The value is {_fmt(value)}")
    return steps, value


def expression_of(row: dict) -> str | None:
    """The arithmetic expression behind a reasoning-gym row (from its stored generator entry)."""
    meta = json.loads(row["metadata"]) if isinstance(row.get("metadata"), str) else row.get("metadata") or {}
    entry = meta.get("entry") or {}
    expr = (entry.get("metadata") or {}).get("expression")
    return expr if isinstance(expr, str) and expr.strip() else None


def add_traces(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Rows with ``trace`` and ``num_steps`` columns. Rows whose expression cannot be traced or
    whose traced value disagrees with the task's answer are dropped and counted."""
    out, dropped = [], {"no_expression": 0, "untraceable": 0, "disagrees_with_answer": 0}
    for row in rows:
        expr = expression_of(row)
        if expr is None:
            dropped["no_expression"] += 1
            continue
        try:
            steps, value = arithmetic_steps(expr)
        except (ValueError, SyntaxError, ZeroDivisionError):
            dropped["untraceable"] += 1
            continue
        try:
            agrees = Fraction(str(row["answer"]).strip()) == value
        except (ValueError, ZeroDivisionError):
            agrees = False
        if not agrees:
            dropped["disagrees_with_answer"] += 1
            continue
        out.append({**row, "trace": "\n".join(steps), "num_steps": len(steps)})
    return out, dropped


def sft_conversation(row: dict, budget: BudgetConfig) -> list[dict[str, str]]:
    """One training conversation in the s1 format (see the module docstring)."""
    trace = row["trace"].rstrip("\n")
    return [{"role": "user", "content": row["question"]},
            {"role": "assistant", "content": f"{budget.think_start}{trace}\n{budget.think_end}{row['answer']}"}]


def majority(answers: list[str]) -> str:
    """The answer most samples agree on, counting equal answers as one vote each: answers are
    grouped when :func:`~selftaught.data.reasoning.answers_match` says they are the same
    ("1,000" and "1000", "0.5" and "1/2", "Paris." and "paris"). Returns the first-seen form
    of the largest group (ties go to the group seen first); "" when every answer is empty."""
    from selftaught.data.reasoning import answers_match

    groups: list[list[str]] = []  # each group: its answers in order seen; [0] represents it
    for a in answers:
        a = a.strip()
        if not a:
            continue
        for g in groups:
            if a == g[0] or answers_match(a, g[0]):
                g.append(a)
                break
        else:
            groups.append([a])
    if not groups:
        return ""
    return max(groups, key=len)[0]  # max keeps the first of equal sizes
