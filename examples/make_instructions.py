"""Build examples/instructions.jsonl: a small offline prompt/response set.

Source: the Python standard library's help topics (`pydoc_data.topics`,
PSF license). Each item asks about one topic and answers with the opening
sentences of its documentation. It exists to exercise instruction tuning
(chat template, loss on the response only) without any download.

  python examples/make_instructions.py > examples/instructions.jsonl
"""
import json
import re

from pydoc_data import topics

for name in sorted(topics.topics):
    lines = [ln for ln in topics.topics[name].splitlines()[1:] if not re.fullmatch(r"\s*[*=\-]{3,}\s*", ln)]
    prose = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("   ") and "::=" not in ln]
    sentences = re.split(r"(?<=[.!?]) ", re.sub(r"\s+", " ", " ".join(prose)).strip())
    answer = " ".join(sentences[:2]).strip()
    if 40 <= len(answer) <= 600 and "*" not in answer[:3]:
        print(json.dumps({"prompt": f"In Python, what is '{name}' about?", "response": answer}))
