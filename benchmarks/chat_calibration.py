"""Write a calibration text of chat-formatted task-suite and chat turns (plus the default docstring set).

    PYTHONPATH=. .venv/bin/python benchmarks/chat_calibration.py --model /work/i16/e64k8 --out /work/i16/chat_calib.txt

`mixserve refit-pregate MODEL --calibration FILE` then fits the pre-gate and ahead gates on routing that
looks like serving traffic (chat template, task questions), not only on library docstrings. Seeds and
questions are disjoint from `record_real_trace.py`'s measured and planning prompts (seeds 0-99 and
100-199 there, 5000+ here; its four chat questions are not used here).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from mixserve.experts.moefy_calib import CALIBRATION_MODULES, module_docstrings  # noqa: E402
from mixserve.loading.tokenizer import load_tokenizer  # noqa: E402
from mixserve.scaling.tasks import TASKS  # noqa: E402

CHAT = ("How do I reverse a list in place?", "What does a context manager do?",
        "Summarise what a hash map is in two sentences.", "Why is my recursive function slow?",
        "Give me three names for a cat.", "What is the capital of France, and why is it famous?",
        "Translate 'good morning' into Spanish.", "Write a haiku about autumn.",
        "How many minutes are there in a week?", "Explain big-O notation to a beginner.")
ANSWERS = ("Sure, here is how.", "Let me think step by step.", "Here is a short answer.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder or name whose tokenizer renders the chat template")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--conversations", type=int, default=400)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    tasks = list(TASKS.values())
    parts = []
    for i in range(args.conversations):
        task = tasks[i % len(tasks)]
        question = task.generate(1, 5000 + i, 1 + i % 3)[0].question
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]},
                    {"role": "user", "content": CHAT[i % len(CHAT)]}]
        parts.append(tok.apply_chat_template(messages, add_generation_prompt=True))
    parts += module_docstrings(CALIBRATION_MODULES)
    args.out.write_text("\n\n".join(parts))
    print(f"wrote {args.out}: {len(parts)} texts, {sum(map(len, parts))} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
