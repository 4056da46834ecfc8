"""WebUI command-line flags for ControlNet Studio (read by the WebUI before anything else loads)."""


def preload(parser):
    parser.add_argument("--controlnet-dir", type=str, default=None,
                        help="Extra folder to scan (recursively) for ControlNet models")
    parser.add_argument("--controlnet-annotator-models-path", type=str, default=None,
                        help="Folder holding preprocessor (annotator) weights")
    parser.add_argument("--controlnet-no-half", action="store_true", default=False,
                        help="Keep ControlNet weights in fp32 even when the UNet runs in half precision")
    parser.add_argument("--controlnet-preprocessor-cache-size", type=int, default=None,
                        help="How many preprocessor results to keep in memory")
