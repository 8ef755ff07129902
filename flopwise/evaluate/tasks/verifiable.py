"""The built-in RL tasks (flopwise/rl/tasks.py) as a generation task, ``flopwise eval --tasks verifiable``: the
held-out tasks of the run's seed (those `flopwise rl` evaluates on), each prompt rendered with the chat template
and its greedy reply checked by the task's own verifier, so the accuracy is the RL run's greedy pass@1 on the same
prompts.  It is meant for runs fine-tuned for chat: a model without the chat tokens reads the template as text."""

from __future__ import annotations

import functools

from flopwise.evaluate.tasks.spec import Example, Task
from flopwise.model.chatml import IM_END
from flopwise.posttrain.template import render_text
from flopwise.rl.rewards import verify
from flopwise.rl.tasks import builtin_tasks

VERIFIABLE = "verifiable"
MAX_NEW_TOKENS = 24  # rl.max_response's default: the replies are short answers


def build_verifiable(seed: int, count: int | None) -> Task:
    """The first ``count`` held-out tasks of ``seed`` (all when None), in their order."""
    _, heldout = builtin_tasks(seed)
    examples = tuple(Example(context=render_text(task.messages, add_generation_prompt=True)[0], target=task.answer,
                             until=(IM_END, "\n"), verify=functools.partial(verify, task))
                     for task in heldout[:count])
    return Task(VERIFIABLE, "generate", examples, "built-in", MAX_NEW_TOKENS)
