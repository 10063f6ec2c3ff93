"""/tokenize and /detokenize: the engine's own templating and tokenizer, nothing generated.

The guard is not involved: these return the client's own text as token ids (or back), and
reveal nothing of what the model knows.
"""

from __future__ import annotations

from server.engine import ChatPrompt, TextPrompt
from server.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from server.services import requests
from server.services.generation import GenerationService


async def tokenize(service: GenerationService, req: TokenizeRequest) -> TokenizeResponse:
    """Token ids of the prompt or conversation, as the engine would read them."""
    service.check_model(req.model)
    prompt: ChatPrompt | TextPrompt
    if req.messages is not None:
        service.limits.check_messages(req.messages)
        prompt = ChatPrompt(
            [m.to_param() for m in req.messages],
            tools=requests.tool_dicts(req.tools),
            template_kwargs=requests.template_kwargs(
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                user_kwargs=req.chat_template_kwargs,
            ),
        )
    else:
        service.limits.check_text(req.prompt or "")
        prompt = TextPrompt(req.prompt or "")
    rendered = await service.engine.tokenize(prompt, req.add_special_tokens, req.return_token_strs)
    return TokenizeResponse(
        count=len(rendered.token_ids),
        max_model_len=service.engine.model.max_model_len,
        tokens=rendered.token_ids,
        token_strs=rendered.token_strs,
    )


async def detokenize(service: GenerationService, req: DetokenizeRequest) -> DetokenizeResponse:
    """The text of the token ids."""
    service.check_model(req.model)
    return DetokenizeResponse(prompt=await service.engine.detokenize(req.tokens))
