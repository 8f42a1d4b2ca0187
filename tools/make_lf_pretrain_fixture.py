"""Write LLaMA-Factory's pre-training encoding of the plain-text example data as a test fixture (run in an LF
venv).

    /work/lfvenv/bin/python tools/make_lf_pretrain_fixture.py

Runs LF 0.9.5's `PretrainDatasetProcessor` (unpacked: what jaxsft's plain-text rows follow) on
`examples/data/general_text.jsonl` (`columns: {prompt: text}`) with the committed test tokenizer and the
tiny Llama's, for a few templates and a cutoff that truncates some rows, and stores the input_ids in
tests/fixtures/data/lf_pretrain.json. tests/data/test_replay.py asserts jaxsft gives the same ids.
"""

import json
from pathlib import Path

from llamafactory.data.processor.pretrain import PretrainDatasetProcessor
from llamafactory.data.template import get_template_and_fix_tokenizer
from llamafactory.hparams import DataArguments
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
# (tokenizer, template, cutoff_len, add_bos_token)
CASES = [("tests/fixtures/data/tokenizer", "llama3", 32, False), ("tests/fixtures/data/tokenizer", "qwen", 32, False),
         ("tests/fixtures/data/tokenizer", "empty", 32, True), ("examples/tiny-llama", "llama3", 64, False)]


def main() -> None:
    rows = [json.loads(line)["text"] for line in (REPO / "examples/data/general_text.jsonl").read_text().splitlines()]
    out = []
    for tokenizer_dir, template, cutoff, add_bos in CASES:
        tokenizer = AutoTokenizer.from_pretrained(str(REPO / tokenizer_dir), add_bos_token=add_bos)
        args = DataArguments(template=template, cutoff_len=cutoff, dataset="general_text")
        template_obj = get_template_and_fix_tokenizer(tokenizer, args)
        processor = PretrainDatasetProcessor(template=template_obj, tokenizer=tokenizer, processor=None,
                                             data_args=args)
        result = processor.preprocess_dataset({"_prompt": [[{"role": "user", "content": r}] for r in rows]})
        out.append({"tokenizer": tokenizer_dir, "template": template, "cutoff_len": cutoff, "add_bos_token": add_bos,
                    "input_ids": [list(map(int, ids)) for ids in result["input_ids"]]})
    path = REPO / "tests/fixtures/data/lf_pretrain.json"
    path.write_text(json.dumps(out, separators=(",", ":")))
    print(f"wrote {path}: {len(out)} cases x {len(rows)} rows")


if __name__ == "__main__":
    main()
