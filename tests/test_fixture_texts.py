"""The public text the real-weights tests and scripts read (tests/fixtures/texts/GPL-3) is the very file the committed
references were made from: the GPL-3 text Debian ships in its system licence folder, byte for byte (not read: absent on a Mac)."""

import hashlib
import json
from pathlib import Path

FIX = Path(__file__).parent / "fixtures"
GPL3 = FIX / "texts" / "GPL-3"
GPL3_SHA256 = "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986"


def test_gpl3_is_the_text_the_references_were_made_from():
    data = GPL3.read_bytes()
    assert len(data) == 35149 and b"\r" not in data  # a checkout that rewrote line endings fails here first
    assert hashlib.sha256(data).hexdigest() == GPL3_SHA256
    llama = json.loads((FIX / "llama_perplexity_270m.json").read_text())
    assert llama["text_sha256"] == GPL3_SHA256  # scripts/llama_perplexity.py hashed the file it tokenized
