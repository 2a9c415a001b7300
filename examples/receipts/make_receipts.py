"""Make the receipts example: small receipt images (PNG and JPEG) and PDFs, drawn with Pillow, and
the JSONL files that point at them. Deterministic; no downloads.

    python examples/receipts/make_receipts.py [FOLDER]      (default: this folder)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

RECEIPTS = [
    {"merchant": "Blue Kettle Cafe", "date": "2026-11-03", "items": [("Flat white", 3.40), ("Croissant", 2.80)]},
    {"merchant": "Hardware Hut", "date": "2026-11-07", "items": [("Hinges x4", 11.96), ("Wood glue", 6.50)]},
    {"merchant": "Green Grocer", "date": "2026-11-12", "items": [("Apples 1kg", 3.20), ("Kale", 2.10), ("Eggs", 4.35)]},
    {"merchant": "Page Turner Books", "date": "2026-11-20", "items": [("Paperback", 12.99)]},
]


def draw(receipt: dict) -> Image.Image:
    font = ImageFont.load_default(size=22)
    lines = [receipt["merchant"].upper(), f"Date: {receipt['date']}", ""]
    lines += [f"{name:<18}{price:>8.2f}" for name, price in receipt["items"]]
    total = sum(price for _, price in receipt["items"])
    lines += ["", f"{'TOTAL':<18}{total:>8.2f}", "Thank you!"]
    image = Image.new("RGB", (420, 60 + 34 * len(lines)), "white")
    pen = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        pen.text((24, 30 + 34 * i), line, fill="black", font=font)
    return image


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images, documents = [], []
    for i, receipt in enumerate(RECEIPTS):
        image = draw(receipt)
        total = round(sum(price for _, price in receipt["items"]), 2)
        answer = {"merchant": receipt["merchant"], "date": receipt["date"], "total": total}
        name = f"receipt-{i + 1}.{'png' if i % 2 == 0 else 'jpg'}"
        image.save(folder / name, optimize=True) if name.endswith("png") else image.save(folder / name, quality=80)
        images.append({"id": f"r{i + 1}", "image": name, "expected": answer})
        pdf = f"receipt-{i + 1}.pdf"
        image.save(folder / pdf, "PDF", resolution=100)
        documents.append({"id": f"d{i + 1}", "pdf": pdf, "expected": answer})
    for name, rows in (("receipts.jsonl", images), ("receipt-pdfs.jsonl", documents)):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(images)} images, {len(documents)} PDFs and their JSONL files in {folder}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
