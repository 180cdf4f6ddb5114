"""The names the model is served under: the 404 for any other name, and `GET /v1/models`."""

from __future__ import annotations

from pagedllm.entrypoints.openai.protocol import ErrorResponse, ModelCard, ModelList, make_error


class OpenAIServingModels:
    """The names the model is served under; a request naming another model gets a 404."""

    def __init__(self, served_model_names: list[str], root: str, max_model_len: int) -> None:
        assert served_model_names
        self.served_model_names = served_model_names
        self.root = root
        self.max_model_len = max_model_len

    def check_model(self, name: str | None) -> ErrorResponse | None:
        if name is None or name in self.served_model_names:
            return None
        return make_error(
            f"The model `{name}` does not exist; this server serves "
            f"{', '.join(repr(n) for n in self.served_model_names)}.",
            404, param="model", code="model_not_found",
        )

    def model_name(self, name: str | None) -> str:
        return name or self.served_model_names[0]

    def list_models(self) -> ModelList:
        return ModelList(data=[
            ModelCard(id=name, root=self.root, max_model_len=self.max_model_len)
            for name in self.served_model_names
        ])
