"""KTO's rows with their KL samples: each labelled completion beside a mismatched one for its prompt.

KTO's reference point z0 estimates KL(pi || pi_ref) from completions paired with prompts they do not
answer (Ethayarajh et al. 2024, sec. 4.1). The mismatched completion of row i is fixed here, as a
function of the prepared rows alone, so that the reference stage and the training stage see the same
pairs and the reference's log-probs of both can be computed once and cached.

The result is in the pair layout ``collate_preference`` and ``preference_forward`` read (sequences
0..B-1 from ``chosen_ids``, B..2B-1 from ``rejected_ids``): ``chosen_ids`` holds the row's own
completion, ``rejected_ids`` the mismatched KL completion. Nothing is "rejected" here; the layout is
reused so that one collator, one forward and one reference pass serve paired and unpaired data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def kl_partner(rows: Sequence[Mapping], index: int) -> int:
    """The next row after ``index`` (cyclically) whose prompt differs from row ``index``'s: its
    completion does not answer this prompt. (A pair unpaired gives two neighbours with one prompt, so
    the very next row would often answer it.) ValueError when every row has the same prompt."""
    n = len(rows)
    prompt = rows[index]["prompt_ids"]
    for step in range(1, n):
        j = (index + step) % n
        if rows[j]["prompt_ids"] != prompt:
            return j
    raise ValueError(
        f"all {n} unpaired rows have the same prompt: KTO's KL estimate needs completions of other prompts"
    )


def with_kl_completions(rows: Sequence[Mapping], max_length: int) -> list[dict]:
    """Each row in the pair layout: ``chosen_ids`` its completion, ``rejected_ids`` the completion of
    ``kl_partner``, cut so that prompt + it fit ``max_length`` (at least one token); other fields kept."""
    out = []
    for i, row in enumerate(rows):
        prompt = list(row["prompt_ids"])
        room = max(max_length - len(prompt), 1)
        kl = list(rows[kl_partner(rows, i)]["completion_ids"])[:room]
        rest = {k: v for k, v in row.items() if k not in ("completion_ids",)}
        out.append({**rest, "prompt_ids": prompt, "chosen_ids": list(row["completion_ids"]), "rejected_ids": kl})
    return out
