"""A local CLIP index in clip-retrieval's layout: build (embed + autofaiss), search (memory-mapped) and serve
(clip-retrieval's HTTP routes). Modules: clip_model (open_clip from a local weights file), embed (the
`img_emb/`, `text_emb/`, `metadata/` shards), build (the resumable build), search (LocalIndex), server."""
