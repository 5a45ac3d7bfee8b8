"""The workers' prompt format (after Hogwild! Inference, `eqimp/hogwild_llm` formatting.py).

The cache of worker `w` reads as one text:

    <problem prompt><sep><collaboration rules><sep>### Past steps<sep>
    **Alice [1]:** ...<sep>**Bob [1]:** ...<sep>            finished steps, in finishing order
    <sep>### Work in progress (others)<sep>
    **Bob [2]:** partial step of another worker<...><sep>    one per other worker
    ### Work in progress (own)<sep>
    **Alice [2]:** own partial step                          where w writes

A step ends at the separator (a token containing "\\n\\n") when the text before it ends a sentence;
the finished step joins "Past steps" for everyone. Every `collab_every` generated tokens a new step
starts with "Quick check: am I doing redundant work? (yes/no): ". Tokens that would break the layout
("#" headers, EOS/BOS) are forbidden while reasoning. When the budget ends with no `\\boxed{}` answer,
the finisher view (every worker's step, then the s1-style suffix) is decoded greedily.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixserve.scaling.answers import boxed_contents

NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")

RULES = """I will collaborate on this problem with {num_others} other assistant{plural}. We will write our \
thoughts simultaneously and collaborate without redundant work. We can collaborate by doing different parts \
of the problem, double-checking each other's results, trying different approaches, or any other means.

There are {num_workers} assistants, including myself. We will refer to each other as {names}.

We will solve the problem together, writing our thoughts in parallel. We will be able to see each other's \
past and current thoughts as we write them. We will see each other's previous steps as \
**AssistantName [step]:** <...> .

In the '{history}' section, the automated system will gather the thoughts of {names} as we write them.

After the '{others}' section, I will see the other assistants' unfinished steps. They will write those \
steps concurrently with me. I will take into account what they are doing. If another assistant gives me \
suggestions, I will address them.

I will always see *other* assistants' incomplete thoughts first, and then, after '{own}', my own step.

If what I am currently doing is the same that another assistant is doing or has already done, I will stop \
(e.g. {first} may say 'Wait, I was doing the same as {second} ...') and change to a different task right away.

When we are done with the problem, any one of us can return the **final** answer as \\boxed{{answer here}} , \
after which, we will no longer be able to update it."""


@dataclass(frozen=True)
class HogwildFormat:
    """Texts of the workers' layout; every field is configurable (defaults follow the paper)."""

    names: tuple[str, ...] = NAMES
    """Worker names, the first `workers` are used."""
    rules: str = RULES
    """Collaboration rules after the problem prompt (first person, as the paper's `first_person`
    variant); placeholders: {num_workers} {num_others} {plural} {names} {first} {second} {history}
    {others} {own}."""
    sep: str = "\n\n"
    """Step separator."""
    history_header: str = "### Past steps"
    others_header: str = "### Work in progress (others)"
    own_header: str = "### Work in progress (own)"
    pivot: str = "<...>"
    """Ends another worker's unfinished step in a view."""
    first_step: tuple[str, str] = ("Hi, I'm {name}. Here's how we can", "Hi, I'm {name}.")
    """Opening of the first worker's first step, and of every other worker's."""
    collab_message: str = "Quick check: am I doing redundant work? (yes/no): "
    finisher_suffix: str = ("\n\nWait, given the limited time, I have to give an answer right now. "
                            "Considering all my previous attempts, I have to conclude that the final "
                            "answer is \\boxed{")
    end_of_step_chars: str = ".?!…"
    """A separator ends a step only after one of these (the paper's sentence-end rule)."""
    forbidden: tuple[str, ...] = ("#", "##", "###", "####", " #", " ##", " ###", "</think>")
    """Texts whose single-token encodings may not be sampled while reasoning (EOS/BOS always)."""

    def __post_init__(self) -> None:
        if not self.sep or len(set(self.names)) != len(self.names) or len(self.names) < 1:
            raise ValueError(f"HogwildFormat: sep must be non-empty and names distinct, got sep={self.sep!r} "
                             f"names={self.names!r}")

    def worker_names(self, workers: int) -> tuple[str, ...]:
        if not 1 <= workers <= len(self.names):
            raise ValueError(f"invalid workers={workers}: must be in [1, {len(self.names)}] (one name each)")
        return self.names[:workers]

    def common(self, workers: int) -> str:
        """Text after the problem prompt, before the first past step."""
        names = self.worker_names(workers)
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        rules = self.rules.format(num_workers=workers, num_others=workers - 1, plural="s" if workers > 2 else "",
                                  names=listed, first=names[0], second=names[-1], history=self.history_header,
                                  others=self.others_header, own=self.own_header)
        return self.sep + rules + self.sep + self.history_header + self.sep

    def step_header(self) -> str:
        """Between the past steps and the others' work in progress."""
        return self.sep + self.others_header + self.sep

    def pivot_text(self) -> str:
        return self.pivot + self.sep

    def own_header_text(self) -> str:
        return self.own_header + self.sep

    def step_prefix(self, name: str, index: int, collab: bool = False) -> str:
        return f"**{name} [{index}]:** " + (self.collab_message if collab else "")

    def first_prefix(self, worker: int, name: str) -> str:
        opening = self.first_step[0 if worker == 0 else 1].format(name=name)
        return self.step_prefix(name, 1) + opening

    def ends_step(self, step_text: str, last_token_text: str) -> bool:
        """The step's last token completes a separator (it may be split over tokens, e.g. "\n", "\n"),
        and what comes before that separator ends a sentence."""
        if not last_token_text or self.sep not in step_text[-(len(last_token_text) + len(self.sep) - 1):]:
            return False
        before = step_text[:step_text.rindex(self.sep)].strip()
        return bool(before) and before[-1] in self.end_of_step_chars

    def answer(self, text: str) -> str | None:
        """The last `\\boxed{...}` body in `text`, if any."""
        found = boxed_contents(text)
        return found[-1] if found else None
