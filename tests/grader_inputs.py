"""Adversarial responses for the graders: huge boxed numbers and the shapes that break naive parsers
(unclosed groups repeated, deep nesting, huge digit runs, long whitespace after a cue), up to 1 MB each."""

MB = 1_000_000

# Texts the graders must grade in linear time (name -> response).
LONG = {
    "unclosed \\boxed{ x14k": "\\boxed{" * 14_000,
    "unclosed \\boxed{ x140k": "\\boxed{" * 140_000,
    "boxed 100k digits": "\\boxed{" + "9" * 100_000 + "}",
    "boxed 1 MB digits": "\\boxed{" + "9" * MB + "}",
    "stated 1 MB digits": "The answer is " + "9" * MB,
    "boxed{{ x140k then }": "boxed{{" * 140_000 + "}",
    "nested boxes 70k deep": "\\boxed{" * 70_000 + "1" + "}" * 70_000,
    "1 MB of {": "{" * MB,
    "1 MB of }": "}" * MB,
    "{} x500k": "{}" * (MB // 2),
    "boxed{} x140k": "boxed{}" * 140_000,
    "\\frac{ x160k": "\\frac{" * 160_000,
    "cue then 1 MB spaces": "The answer is " + " " * MB + "x",
    "cue x100k": "answer is " * 100_000,
    "1, x500k": "1," * (MB // 2),
    "1/ x500k": "1/" * (MB // 2),
    "1. x500k": "1." * (MB // 2),
    "= then 1 MB spaces": "=" + " " * MB + "x",
    "=1 x500k": "=1" * (MB // 2),
    "= then 1 MB digits": "=" + "7" * MB,
}

# Short answers that make math-verify run into its timeout; each alone in a box.
SLOW_MATH_ANSWERS = [
    "10^{1000000000}",
    "10000000!",
    "9^{9^{9^{9^{9}}}}",
    "{" * 500 + "1" + "}" * 500,
    "2^{2^{2^{2^{2^{2^{2}}}}}}",
]
