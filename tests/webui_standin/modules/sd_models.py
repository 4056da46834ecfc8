"""WebUI 1.10 `modules.sd_models`: `model_data.sd_model` is the loaded checkpoint (None before one loads); unlike
`shared.sd_model` it never starts a load. The stand-in's loaded model is whatever a test put in `shared.sd_model`."""


class ModelData:
    @property
    def sd_model(self):
        from modules import shared

        return shared.sd_model


model_data = ModelData()
