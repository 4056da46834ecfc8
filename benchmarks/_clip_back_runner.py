"""Starts clip-retrieval's own `clip_back` on an index folder, for bench_index.py. Run with the Python of a venv
that has clip-retrieval installed (it cannot live beside the WebUI's pins):

    SIDE/bin/python benchmarks/_clip_back_runner.py INDEX PORT

clip_back loads a CLIP model at boot through all_clip, which downloads weights; the benchmark queries with
`embedding_input` only, so a tiny open_clip model of the index's width (random weights) stands in for it.
Everything else is clip_back as shipped: faiss memory-mapped, parquet metadata, Flask on 127.0.0.1.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lib_controlnet.compat  # noqa: E402  (the CPU torchvision repair, before open_clip imports torchvision)

lib_controlnet.compat.ensure_torchvision()


def main() -> None:
    index, port = Path(sys.argv[1]).resolve(), int(sys.argv[2])
    dim = json.loads((index / "index_info.json").read_text())["dim"]
    import all_clip
    import open_clip

    def tiny_clip(*args, **kwargs):
        model = open_clip.CLIP(embed_dim=dim, vision_cfg={"image_size": 32, "layers": 1, "width": 32,
                                                          "patch_size": 8, "head_width": 16},
                               text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1}).eval()
        return model, (lambda image: None), open_clip.get_tokenizer("ViT-B-32")

    all_clip.load_clip = tiny_clip
    from clip_retrieval.clip_back import clip_back  # the package exports the function under the module's name

    paths = Path(tempfile.mkdtemp()) / "indices_paths.json"
    paths.write_text(json.dumps({index.name: str(index)}))
    clip_back(indices_paths=str(paths), port=port, enable_faiss_memory_mapping=True,
              columns_to_return=["url", "caption"], enable_mclip_option=False, use_jit=False,
              provide_safety_model=False, provide_violence_detector=False,
              provide_aesthetic_embeddings=False)


if __name__ == "__main__":
    main()
