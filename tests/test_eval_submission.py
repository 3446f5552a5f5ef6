"""Submission files: what the original convert_*_for_submission.py scripts write, and the MMBench .xlsx."""

import json
import re
import zipfile

from llava_jax.eval.submission import write_submission
from llava_jax.eval.vqa_accuracy import normalize_answer
from llava_jax.eval.xlsx import column_name


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_vqav2_covers_the_split_with_normalised_answers(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": i, "image": f"{i}.jpg", "text": "q"} for i in (5, 6, 7)])
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 7, "text": "Two dogs."}, {"question_id": 5, "text": "Yes"}])
    summary = write_submission("vqav2", str(tmp_path / "a.jsonl"), str(tmp_path / "up.json"), str(tmp_path / "q.jsonl"))
    assert summary["missing"] == 1
    assert json.loads((tmp_path / "up.json").read_text()) == [
        {"question_id": 5, "answer": "yes"}, {"question_id": 6, "answer": ""}, {"question_id": 7, "answer": "2 dogs"}]


def test_vizwiz_gqa_seed_mmvet(tmp_path):
    write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "image": "VizWiz_test_0.jpg", "text": "q"}])
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 0, "prompt": "q", "text": "Unanswerable."}])
    write_submission("vizwiz", str(tmp_path / "a.jsonl"), str(tmp_path / "v.json"), str(tmp_path / "q.jsonl"))
    assert json.loads((tmp_path / "v.json").read_text()) == [{"image": "VizWiz_test_0.jpg", "answer": "unanswerable"}]
    write_submission("gqa", str(tmp_path / "a.jsonl"), str(tmp_path / "g.json"))
    assert json.loads((tmp_path / "g.json").read_text()) == [{"questionId": 0, "prediction": "unanswerable"}]
    write_submission("mmvet", str(tmp_path / "a.jsonl"), str(tmp_path / "m.json"))
    assert json.loads((tmp_path / "m.json").read_text()) == {"v1_0": "Unanswerable."}
    write_submission("seed", str(tmp_path / "a.jsonl"), str(tmp_path / "s.jsonl"))
    assert json.loads((tmp_path / "s.jsonl").read_text()) == {"question_id": 0, "prediction": "Unanswerable."}
    assert normalize_answer("Unanswerable.") == "unanswerable"


def test_mmbench_xlsx_has_the_servers_columns(tmp_path):
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit\n"
    rows = ["0\tWhat <is> it?\tnan\tcat & dog\tdog\t\t\tB\tc\tIMG\ts\tl\tnan\tdev",
            "1\tq1\th\tred\tblue\tgreen\t\tA\tc\tIMG\ts\tl\tnan\tdev"]  # fmt: skip
    (tmp_path / "mmb.tsv").write_text(header + "\n".join(rows) + "\n")
    write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "round_id": 0, "text": "A"},
                                       {"question_id": 1, "round_id": 1, "text": "C"}])  # fmt: skip
    out = tmp_path / "up.xlsx"
    summary = write_submission("mmbench", str(tmp_path / "a.jsonl"), str(out), str(tmp_path / "mmb.tsv"))
    assert summary["missing"] == 1
    with zipfile.ZipFile(out) as z:
        sheet = z.read("xl/worksheets/sheet1.xml").decode()
        assert {"[Content_Types].xml", "xl/workbook.xml", "_rels/.rels"} <= set(z.namelist())
    cell = r'<c r="([A-Z]+)(\d+)"(?: t="inlineStr")?>(?:<v>(.*?)</v>|<is><t[^>]*>(.*?)</t></is>)</c>'
    cells = re.findall(cell, sheet)
    table = {(col, int(row)): v or t for col, row, v, t in cells}
    header_row = [table[(column_name(i), 1)] for i in range(9)]
    assert header_row == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert table[("A", 2)] == "0" and table[("C", 2)] == "cat &amp; dog" and table[("B", 2)] == "What &lt;is&gt; it?"
    assert ("G", 2) not in table and table[("G", 3)] == "A"  # round 0 only; an unanswered row stays empty
