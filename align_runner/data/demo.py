"""The shipped demo task: two-number addition with a checkable answer, in every canonical format.

``python -m align_runner.data.demo`` regenerates ``align_runner/data/demo/*.jsonl`` deterministically
(a test checks the shipped files equal a fresh generation). Train and held-out splits never share an
(a, b) pair, so held-out accuracy measures generalisation, not recall.

Files (all conversational, DESIGN §5):
- sft-{train,eval}.jsonl: prompt-completion (``prompt``, ``completion``)
- sft-mixed-{train,eval}.jsonl: the same rows, two in three completions with the chatty tail the
  instruction rules out and the preference pairs reject ("45. We add the two numbers together.");
  ``data=demo_mixed`` trains SFT on them, so the model RLHF starts from mostly ignores the instruction
  and a reward model has something to teach
- preference-{train,eval}.jsonl: explicit-prompt pairs; rejected is a near-miss number or a chatty
  answer, the base model's typical failure modes
- prompt-{train,eval}.jsonl: prompt-only with the reference ``answer`` column (eval, GRPO, PPO)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent / "demo"
INSTRUCTION = "Answer with just the number."
SIZES = {"train": 512, "eval": 64}
LOW, HIGH = 1, 50


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}? {INSTRUCTION}"


def _pairs(rng: random.Random) -> dict[str, list[tuple[int, int]]]:
    every = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    rng.shuffle(every)
    n_eval = SIZES["eval"]
    return {"eval": every[:n_eval], "train": every[n_eval : n_eval + SIZES["train"]]}


def chatty(answer: str) -> str:
    """The answer with a tail the instruction rules out. The number comes first, so the arithmetic is
    learnt as from the plain rows and ``last_number`` credits it; 11 SmolLM2 tokens with the end of turn
    (the demo eval generates up to 12)."""
    return f"{answer}. We add the two numbers together."


def _rejected(a: int, b: int, rng: random.Random) -> str:
    if rng.random() < 0.5:
        return str(a + b + rng.choice([-10, -2, -1, 1, 2, 10]))
    return f"To find {a} + {b}, we add the two numbers together."


def generate(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    files: dict[str, list[dict]] = {}
    for split, pairs in _pairs(rng).items():
        sft, pref, prompts = [], [], []
        for a, b in pairs:
            user = [{"role": "user", "content": question(a, b)}]
            answer = str(a + b)
            sft.append({"prompt": user, "completion": [{"role": "assistant", "content": answer}]})
            pref.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": answer}],
                    "rejected": [{"role": "assistant", "content": _rejected(a, b, rng)}],
                }
            )
            prompts.append({"prompt": user, "answer": answer})
        files[f"sft-{split}"] = sft
        # two rows in three chatty, so the SFT model's greedy answers mostly carry the tail; no draws
        # from rng, so the other files stay as they were
        files[f"sft-mixed-{split}"] = [
            {**row, "completion": [{"role": "assistant", "content": chatty(row["completion"][0]["content"])}]}
            if i % 3
            else row
            for i, row in enumerate(sft)
        ]
        files[f"preference-{split}"] = pref
        files[f"prompt-{split}"] = prompts
    return files


def render(files: dict[str, list[dict]]) -> dict[str, str]:
    return {name: "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows) for name, rows in files.items()}


def write(out_dir: Path = DEMO_DIR, seed: int = 0) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in render(generate(seed)).items():
        (out_dir / f"{name}.jsonl").write_text(text)


if __name__ == "__main__":
    write()
    print(f"wrote {DEMO_DIR}")
