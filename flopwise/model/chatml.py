"""The ChatML format's strings, which the post-training template renders and every chat export writes:
``<|im_start|>role\ncontent<|im_end|>\n`` per message (flopwise/posttrain/template.py says why ChatML)."""

from __future__ import annotations

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (IM_START, IM_END)
GENERATION_PROMPT = f"{IM_START}assistant\n"
# The classic ChatML template (as in transformers' chat templating docs), without Qwen's default system
# prompt: what ``render`` writes, character for character.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_files(stage: str) -> dict[str, str]:
    """What a run's exported folder adds for chat: the template and the end-of-turn token, for a post-trained
    run (``posttrain.stage`` sft or dpo); nothing for a pretrained one, which never saw the template."""
    return {} if stage == "pretrain" else {"chat_template": CHAT_TEMPLATE, "end_of_turn": IM_END}
