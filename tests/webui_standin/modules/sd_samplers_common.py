"""modules.sd_samplers_common (WebUI 1.10.1): only `images_tensor_to_samples`, with its signature, for the
full-VAE route (approximation 0)."""
import torch  # noqa: F401

from modules import devices, shared


def images_tensor_to_samples(image, approximation=None, model=None):
    """image[0, 1] -> latent"""
    if model is None:
        model = shared.sd_model
    model.first_stage_model.to(devices.dtype_vae)
    image = image.to(shared.device, dtype=devices.dtype_vae)
    image = image * 2 - 1
    if len(image) > 1:
        return torch.stack([model.get_first_stage_encoding(model.encode_first_stage(torch.unsqueeze(img, 0)))[0]
                            for img in image])
    return model.get_first_stage_encoding(model.encode_first_stage(image))
