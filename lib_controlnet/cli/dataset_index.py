"""`python -m lib_controlnet dataset index build|query|serve`: a local CLIP index (see dataset/index/)."""
from __future__ import annotations

import json


def register(actions) -> None:
    parser = actions.add_parser("index", help="build, query and serve a local CLIP index (clip-retrieval's layout)")
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION")

    build = sub.add_parser("build", help="build (or resume) an index from images, a URL list or embeddings")
    build.add_argument("--out", required=True, help="the index folder, written to and resumed from (default: none, required)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-dir", help="folder of images; <stem>.txt beside an image is its caption (default: none; one source is required)")
    source.add_argument("--url-list", help="parquet/csv/jsonl of image URLs (and captions), downloaded by img2dataset (default: none)")
    source.add_argument("--embeddings", dest="embeddings_dir",
                        help="folder with img_emb/*.npy (+ text_emb/*.npy) and metadata/*.parquet, e.g. a LAION slice (default: none)")
    build.add_argument("--url-col", default="url", help="URL column of the URL list (default: url)")
    build.add_argument("--caption-col", default="caption", help="caption column of the URL list (default: caption)")
    build.add_argument("--clip-model", help="open_clip model name (ViT-B-32, ViT-L-14, ViT-H-14) or a model-config "
                                            ".json; needed to embed images and to query by text or image (default: none)")
    build.add_argument("--clip-weights", help="local weights file of that model: .safetensors, .pt, .bin (default: none)")
    build.add_argument("--index-key", help="faiss index factory key, e.g. IVF4096,PQ64 (default: autofaiss picks "
                                           "one that fits --max-index-memory and tunes its search parameters)")
    build.add_argument("--index-param", help="search parameters stored with the index, e.g. nprobe=64 "
                                             "(default: autofaiss tunes them)")
    build.add_argument("--max-index-memory", default="4G", help="largest index to build (default: 4G)")
    build.add_argument("--current-memory", default="16G", help="memory the build may use (default: 16G)")
    build.add_argument("--nb-cores", type=int, help="threads for faiss (default: all cores)")
    build.add_argument("--shard-size", type=int, default=10000, help="images per embedding shard (default: 10000)")
    build.add_argument("--batch-size", type=int, default=32, help="images per CLIP batch (default: 32)")
    build.add_argument("--allow-private-urls", action="store_true",
                       help="allow URL-list downloads from loopback and private networks (default: off)")
    build.set_defaults(func=_build)

    query = sub.add_parser("query", help="search an index folder by text, image or both; prints the results")
    query.add_argument("index", help="the index folder")
    query.add_argument("--text", action="append", default=[], help="text query; repeat for several (default: none)")
    query.add_argument("--image", action="append", default=[], help="example image file; repeat for several (default: none)")
    query.add_argument("--num", type=int, default=10, help="results per query (default: 10)")
    query.add_argument("--modality", choices=("image", "text"), default="image",
                       help="search the image or the caption index (default: image)")
    query.add_argument("--no-dedup", action="store_true", help="keep near-duplicate images (default: dropped)")
    query.add_argument("--json", action="store_true", help="print JSON lines (default: a table)")
    query.set_defaults(func=_query)

    serve = sub.add_parser("serve", help="answer clip-retrieval's /knn-service, /indices-list and /metadata")
    serve.add_argument("index", help="the index folder")
    serve.add_argument("--port", type=int, default=1234, help="port (default: 1234, clip-retrieval back's)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--name", help="index name clients send as indice_name (default: the folder's name)")
    serve.set_defaults(func=_serve)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def _build(args) -> int:
    from lib_controlnet.dataset.index.build import IndexBuildConfig, build_local_index

    config = IndexBuildConfig(
        out_dir=args.out, image_dir=args.image_dir, url_list=args.url_list, url_col=args.url_col,
        caption_col=args.caption_col, embeddings_dir=args.embeddings_dir, clip_model=args.clip_model,
        clip_weights=args.clip_weights, index_key=args.index_key, index_param=args.index_param,
        max_index_memory=args.max_index_memory, current_memory=args.current_memory, nb_cores=args.nb_cores,
        shard_size=args.shard_size, batch_size=args.batch_size, allow_private_urls=args.allow_private_urls)
    build_local_index(config, say=lambda line: print(line, flush=True))
    return 0


def _query(args) -> int:
    from pathlib import Path

    from lib_controlnet.dataset.index.search import open_index
    from lib_controlnet.errors import UserError

    if not args.text and not args.image:
        raise UserError("Give --text and/or --image.")
    index = open_index(args.index)
    queries = [(t, lambda t=t: index.text_vector(t)) for t in args.text]
    for path in args.image:
        if not Path(path).is_file():
            raise UserError(f"Example image {path} does not exist.")
        queries.append((path, lambda p=path: index.image_vector(Path(p).read_bytes())))
    for label, vector in queries:
        for row in index.search(vector(), modality=args.modality, num_images=args.num, deduplicate=not args.no_dedup):
            if args.json:
                print(json.dumps({"query": label, **row}, default=str))
            else:
                where = row.get("url") or row.get("image_path") or ""
                print(f"{row['similarity']:.4f}\t{row['id']}\t{where}\t{row.get('caption') or ''}")
    return 0


def _serve(args) -> int:
    from lib_controlnet.dataset.index.search import open_index
    from lib_controlnet.dataset.index.server import make_server

    index = open_index(args.index)
    server = make_server(index, args.host, args.port, args.name)
    host, port = server.server_address[:2]
    print(f"serving index {args.name or index.name} ({index.offsets[-1]} rows) on http://{host}:{port}/knn-service",
          flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
