"""Benchmarks: answer a question file, score an answer file, write a test server's submission file.

    python -m llava_jax.eval run --task gqa --model DIR --questions llava_gqa_testdev_balanced.jsonl \\
        --images gqa/images --answers answers/gqa.jsonl [--batch_size 8] [--num_shards N --shard K]
    python -m llava_jax.eval score --task gqa --answers answers/gqa.jsonl \\
        --annotations testdev_balanced_questions.json
    python -m llava_jax.eval submit --task vqav2 --answers A --questions Q --out upload.json

Each prints one JSON object as its last line. Rerunning `run` on the same --answers resumes.
A mistake in the inputs is reported as one line, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from llava_jax.errors import UserError
from llava_jax.eval.tasks import TASKS


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m llava_jax.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="answer a task's question file (batched, resumable, sharded)")
    run.add_argument("--task", required=True, choices=sorted(TASKS))
    run.add_argument("--model", required=True, help="a checkpoint llava_jax.load reads")
    run.add_argument("--questions", required=True, help="the task's question file in the original format")
    run.add_argument("--images", default="", help="the folder the question file's image paths are relative to")
    run.add_argument("--answers", required=True, help="answer .jsonl to write (resumed when it exists)")
    run.add_argument("--batch_size", type=int, default=1)
    run.add_argument("--max_new_tokens", type=int, default=None, help="default: the original script's")
    run.add_argument("--template", default=None, help="default: vicuna_v1 (1.5), the checkpoint's own (1.6)")
    run.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    run.add_argument("--all_rounds", action="store_true", help="MMBench: ask each question once per "
                     "rotation of its options (circular evaluation)")  # fmt: skip
    run.add_argument("--num_shards", type=int, default=None, help="default: jax.process_count()")
    run.add_argument("--shard", type=int, default=None, help="default: jax.process_index()")
    run.add_argument("--merge_timeout", type=float, default=3600.0, help="seconds shard 0 waits for the other "
                     "shards' answers before it merges them (a later run of any shard merges too)")  # fmt: skip
    run.add_argument("--model_id", default=None, help="the answers' model_id (default: the model's folder name)")
    run.add_argument("--no_progress", action="store_true")

    score = sub.add_parser("score", help="score an answer file with the original scorers' rules")
    score.add_argument("--task", required=True, choices=sorted(TASKS))
    score.add_argument("--answers", required=True)
    score.add_argument("--annotations", required=True, help="the ground truth (see llava_jax.eval.scorers)")
    score.add_argument("--questions", default=None, help="the question file (pope, vizwiz)")

    submit = sub.add_parser("submit", help="write the file a test server or GPT judge reads")
    submit.add_argument("--task", required=True, choices=sorted(TASKS))
    submit.add_argument("--answers", required=True)
    submit.add_argument("--questions", default=None, help="the split's question file (vqav2, vizwiz) or "
                        "the MMBench tsv (mmbench)")  # fmt: skip
    submit.add_argument("--out", required=True)
    return parser.parse_args(argv)


def run_command(args) -> dict:
    import jax

    import llava_jax
    from llava_jax.eval.runner import run_questions
    from llava_jax.eval.tasks import get_task, load_questions

    task = get_task(args.task)
    questions = load_questions(args.task, args.questions, args.images, all_rounds=args.all_rounds)
    num_shards = jax.process_count() if args.num_shards is None else args.num_shards
    shard = jax.process_index() if args.shard is None else args.shard
    pipe = llava_jax.load(args.model, dtype=args.dtype)
    return run_questions(pipe, questions, args.answers, task=args.task, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens or task.max_new_tokens, template=args.template,
                         model_id=args.model_id, shard=shard, num_shards=num_shards,
                         progress=not args.no_progress, merge_timeout=args.merge_timeout)  # fmt: skip


def score_command(args) -> dict:
    from llava_jax.eval.scorers import score

    return score(args.task, args.answers, args.annotations, questions=args.questions)


def submit_command(args) -> dict:
    from llava_jax.eval.submission import write_submission

    return write_submission(args.task, args.answers, args.out, questions=args.questions)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = {"run": run_command, "score": score_command, "submit": submit_command}[args.command]
    try:
        result = command(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
