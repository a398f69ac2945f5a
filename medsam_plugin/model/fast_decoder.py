"""A faster SAM mask decoder for one prompt on one cached slice: same weights, same maths.

Re-prompting a slice whose embedding is cached costs only the prompt encoder and the mask
decoder, so the decoder sets the latency of every click after the first. `FastMaskDecoder`
computes what `mask_decoder.MaskDecoder` computes, for a batch of one, with three changes of
schedule that leave the arithmetic in fp32:

- **Per-slice work is done once.** With no mask prompt, the image side of the first two-way
  block does not depend on the prompt: the image tokens (embedding + "no mask" embedding), their
  sum with the positional encoding, and three projections of them (the token->image keys and
  values, the image->token queries). `SliceState` keeps them, so a second prompt on the slice
  starts after them.
- **No layout changes.** Image tokens stay (4096, 256) row-major from the embedding to the mask.
  Multi-head attention between 4096 image tokens and a handful of prompt tokens is written as
  two matmuls against block-diagonal matrices of the few prompt tokens, so no head is ever
  transposed out of the image tokens. The two 2x2 stride-2 transposed convolutions of the
  upscaling are per-pixel matmuls (each input pixel gives a 2x2 block of output pixels), done
  in token order; one small permutation at the end puts the 256x256 logits in raster order.
- **Only the asked-for masks.** The single-mask call computes one hypernetwork vector and one
  mask, not all four.

Results agree with the reference decoder to fp32 rounding (summation order differs); the test
suite checks logits and IoU against it, and the Dice check in the benchmarks covers propagation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SliceState:
    """The prompt-independent part of decoding one slice with no mask prompt."""

    keys: torch.Tensor  # (HW, D) image tokens: embedding + dense prompt embedding
    keys_pe: torch.Tensor  # (HW, D) keys + positional encoding
    t2i_k: torch.Tensor  # (HW, Di) block 0 token->image keys, already scaled by 1/sqrt(head dim)
    t2i_v: torch.Tensor  # (HW, Di) block 0 token->image values
    i2t_q: torch.Tensor  # (HW, Di) block 0 image->token queries


def _block_diag_rows(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., N, H*d) -> (..., H*N, H*d): row h*N + n keeps only head h's d columns of x[n], zeros elsewhere."""
    *lead, n, width = x.shape
    d = width // heads
    out = x.new_zeros(*lead, heads, n, heads, d)
    idx = torch.arange(heads)
    out[..., idx, :, idx, :] = x.view(*lead, n, heads, d).movedim(-2, 0)  # (H, ..., N, d)
    return out.view(*lead, heads * n, width)


def _diag_blocks(y: torch.Tensor, heads: int, n: int) -> torch.Tensor:
    """(..., H*N, H*d) -> (..., N, H*d): the inverse of `_block_diag_rows` (head h's columns from rows h*N..)."""
    *lead, _, width = y.shape
    d = width // heads
    idx = torch.arange(heads)
    blocks = y.view(*lead, heads, n, heads, d)[..., idx, :, idx, :]  # (H, ..., N, d): advanced indices lead
    return blocks.movedim(0, -2).reshape(*lead, n, heads * d)


class FastMaskDecoder:
    """`decode(state_or_embedding, sparse, dense)` -> (low-res logits (M, 256, 256), IoU (M,)).

    Built from a loaded SAM-family model (its `prompt_encoder` and `mask_decoder`); it reads
    their parameters at every call, so fine-tuned weights take effect at once. Only the
    positional encoding (a fixed buffer) is kept.
    """

    def __init__(self, sam, image_pe: torch.Tensor | None = None) -> None:
        self.decoder = sam.mask_decoder
        self.prompt_encoder = sam.prompt_encoder
        self.transformer = self.decoder.transformer
        with torch.inference_mode():
            pe = self.prompt_encoder.get_dense_pe() if image_pe is None else image_pe  # (1, D, h, w)
            self.grid = tuple(pe.shape[-2:])
            self.key_pe = pe[0].flatten(1).t().contiguous()  # (HW, D)

    # ------------------------------------------------------------------ per slice
    def dense_tokens(self, masks: torch.Tensor) -> torch.Tensor:
        """The prompt encoder's dense embedding of a mask prompt (1, 1, 4h, 4w), as image tokens (HW, D).

        `mask_downscaling` (two 2x2 stride-2 convolutions, each followed by a channel layer norm and
        GELU, then a 1x1 convolution) written as per-pixel matmuls in token order, as the upscaling
        is: several times faster than the module's channel-first layer norms on a CPU (a
        correction and every box+mask propagation step encode a mask prompt)."""
        md = self.prompt_encoder.mask_downscaling
        conv1, norm1, conv2, norm2, conv3 = md[0], md[1], md[3], md[4], md[6]
        h, w = self.grid
        with torch.inference_mode():
            # Pixel (4i + 2a + dy, 4j + 2b + dx) -> row (i, j, a, b), column (dy, dx).
            x = masks.reshape(h, 2, 2, w, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(-1, 4)
            c1 = conv1.out_channels
            y = F.linear(x, conv1.weight.reshape(c1, 4), conv1.bias)  # (HW*4, c1)
            y = F.gelu(F.layer_norm(y, (c1,), norm1.weight, norm1.bias, norm1.eps)).reshape(h * w, 4 * c1)
            c2 = conv2.out_channels
            y = F.linear(y, conv2.weight.permute(0, 2, 3, 1).reshape(c2, -1), conv2.bias)  # columns (a, b, c)
            y = F.gelu(F.layer_norm(y, (c2,), norm2.weight, norm2.bias, norm2.eps))
            return F.linear(y, conv3.weight.reshape(conv3.out_channels, -1), conv3.bias)  # (HW, D)

    def slice_state(self, embedding: torch.Tensor, dense_tokens: torch.Tensor | None = None) -> SliceState:
        """The prompt-independent tensors for embedding (1, D, h, w) and a mask prompt's
        `dense_tokens` (HW, D, from `dense_tokens`); "no mask" without them."""
        with torch.inference_mode():
            if dense_tokens is None:
                dense_tokens = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1)  # (1, D), broadcast
            keys = (embedding[0].flatten(1).t() + dense_tokens).contiguous()  # (HW, D)
            keys_pe = keys + self.key_pe
            block = self.transformer.layers[0]
            t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
            scale = 1.0 / math.sqrt(t2i.internal_dim // t2i.num_heads)
            return SliceState(
                keys=keys,
                keys_pe=keys_pe,
                t2i_k=F.linear(keys_pe, t2i.k_proj.weight, t2i.k_proj.bias).mul_(scale),
                t2i_v=F.linear(keys, t2i.v_proj.weight, t2i.v_proj.bias),
                i2t_q=F.linear(keys_pe, i2t.q_proj.weight, i2t.q_proj.bias),
            )

    # ------------------------------------------------------------------ attention pieces
    def _image_projections(self, t2i, i2t, keys):
        """A block's image-side projections (the token-to-image keys, pre-scaled, and values; the
        image-to-token queries), for blocks after the first, whose keys the tokens have changed."""
        keys_pe = keys + self.key_pe
        scale = 1.0 / math.sqrt(t2i.internal_dim // t2i.num_heads)
        return t2i.k_proj(keys_pe).mul_(scale), t2i.v_proj(keys), i2t.q_proj(keys_pe)

    @staticmethod
    def _token_to_image(attn, q_in, k_scaled, v):
        """Prompt tokens (N, D) attend to image tokens: k_scaled, v (HW, Di) -> (N, D)."""
        heads, n = attn.num_heads, q_in.shape[0]
        q = _block_diag_rows(attn.q_proj(q_in), heads)  # (H*N, Di)
        scores = q @ k_scaled.t()  # (H*N, HW): head h's scores in rows h*N..
        out = scores.softmax(dim=-1) @ v  # (H*N, Di)
        return attn.out_proj(_diag_blocks(out, heads, n))

    @staticmethod
    def _image_to_token(attn, q_img, k_in, v_in):
        """Image tokens attend to prompt tokens: q_img (HW, Di) projected queries -> (HW, D)."""
        heads = attn.num_heads
        d = attn.internal_dim // heads
        k = _block_diag_rows(attn.k_proj(k_in), heads) / math.sqrt(d)  # (H*N, Di)
        v = _block_diag_rows(attn.v_proj(v_in), heads)
        n = k_in.shape[0]
        # Scores as (H, N, HW): a softmax over N along a strided axis is several times faster
        # here than over a contiguous axis of length N (a handful).
        scores = (k @ q_img.t()).view(heads, n, -1)
        out = scores.softmax(dim=1).view(heads * n, -1).t() @ v  # (HW, Di), heads side by side
        return attn.out_proj(out)

    # ------------------------------------------------------------------ decode
    def decode(self, state: SliceState, sparse: torch.Tensor, multimask: bool):
        """sparse (1, K, D) prompt tokens -> (low-res logits (M, 4h, 4w), IoU (M,)), M = 3 or 1."""
        dec, tr = self.decoder, self.transformer
        with torch.inference_mode():
            tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight, sparse[0]], dim=0)  # (Nt, D)
            queries, keys, keys_pe = tokens, state.keys, state.keys_pe
            for i, block in enumerate(tr.layers):
                if block.skip_first_layer_pe:
                    queries = block.self_attn(queries[None], queries[None], queries[None])[0]
                else:
                    q = queries + tokens
                    queries = queries + block.self_attn(q[None], q[None], queries[None])[0]
                queries = block.norm1(queries)

                t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
                if i == 0:
                    k_scaled, v, q_img = state.t2i_k, state.t2i_v, state.i2t_q
                else:
                    k_scaled, v, q_img = self._image_projections(t2i, i2t, keys)
                queries = block.norm2(queries + self._token_to_image(t2i, queries + tokens, k_scaled, v))
                queries = block.norm3(queries + block.mlp(queries))
                q = queries + tokens
                keys = block.norm4(keys + self._image_to_token(i2t, q_img, q, queries))

            final = tr.final_attn_token_to_image
            keys_pe = keys + self.key_pe
            scale = 1.0 / math.sqrt(final.internal_dim // final.num_heads)
            attn = self._token_to_image(final, queries + tokens, final.k_proj(keys_pe).mul_(scale), final.v_proj(keys))
            queries = tr.norm_final_attn(queries + attn)

            chosen = range(1, dec.num_mask_tokens) if multimask else range(0, 1)
            hyper = torch.stack([dec.output_hypernetworks_mlps[t](queries[1 + t]) for t in chosen], dim=1)  # (c2, M)
            iou = dec.iou_prediction_head(queries[0])[list(chosen)]
            return self._upscale_and_mask(keys, hyper), iou

    # ------------------------------------------------------------------ several prompts, one call
    @staticmethod
    def _token_attention(attn, q, k, v, key_valid):
        """Attention among prompt tokens (B, N, D) with padded keys (key_valid (B, N) False) left out."""
        def heads(x):  # (B, N, C) -> (B, heads, N, C / heads)
            b, n, c = x.shape
            return x.view(b, n, attn.num_heads, c // attn.num_heads).transpose(1, 2)

        qh, kh, vh = heads(attn.q_proj(q)), heads(attn.k_proj(k)), heads(attn.v_proj(v))
        scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(qh.shape[-1])  # (B, heads, N, N)
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        out = scores.softmax(dim=-1) @ vh  # (B, heads, N, d)
        b, _, n, _ = out.shape
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, attn.internal_dim))

    @staticmethod
    def _token_to_image_batch(attn, q_in, k_scaled, v):
        """`_token_to_image` for B prompts: q_in (B, N, D); k_scaled, v (B, HW, Di) -> (B, N, D)."""
        heads, n = attn.num_heads, q_in.shape[1]
        q = _block_diag_rows(attn.q_proj(q_in), heads)  # (B, H*N, Di)
        out = (q @ k_scaled.transpose(1, 2)).softmax(dim=-1) @ v  # (B, H*N, Di)
        return attn.out_proj(_diag_blocks(out, heads, n))

    @staticmethod
    def _image_to_token_batch(attn, q_img, k_in, v_in, key_valid):
        """`_image_to_token` for B prompts, padded tokens (key_valid (B, N) False) left out:
        q_img (B, HW, Di), k_in and v_in (B, N, D) -> (B, HW, D)."""
        heads = attn.num_heads
        d = attn.internal_dim // heads
        b, n = k_in.shape[:2]
        k = _block_diag_rows(attn.k_proj(k_in), heads) / math.sqrt(d)  # (B, H*N, Di)
        v = _block_diag_rows(attn.v_proj(v_in), heads)
        scores = (k @ q_img.transpose(1, 2)).view(b, heads, n, -1)  # softmax over N, strided (see above)
        scores = scores.masked_fill(~key_valid[:, None, :, None], float("-inf"))
        out = scores.softmax(dim=2).view(b, heads * n, -1).transpose(1, 2) @ v  # (B, HW, Di)
        return attn.out_proj(out)

    def decode_batch(self, states: list[SliceState], sparse: torch.Tensor, valid: torch.Tensor, multimask: bool):
        """Several prompts on one slice in one call (a correction's ways of asking the model).

        states: each prompt's `slice_state` (prompts with the same dense prompt share one object);
        sparse (B, K, D) prompt tokens, padded to the longest prompt; valid (B, K) bool, False on
        padding -> (low-res logits (B, M, 4h, 4w), IoU (B, M)), M = 3 or 1.

        Padding tokens are masked out of every attention in which tokens are keys (token self-
        attention and image->token), so each prompt gets the answer `decode` gives it alone, up to
        fp32 summation order: prompts of different lengths (with or without a box, fewer clicks)
        share the call without SAM's "not a point" tokens changing anyone's answer.
        """
        dec, tr = self.decoder, self.transformer
        with torch.inference_mode():
            b = sparse.shape[0]
            out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)  # (1+T, D)
            tokens = torch.cat([out_tokens[None].expand(b, -1, -1), sparse], dim=1)  # (B, Nt, D)
            key_valid = torch.cat([valid.new_ones(b, out_tokens.shape[0]), valid.bool()], dim=1)  # (B, Nt)

            def stacked(name):  # (B, HW, .) from the states; one shared state is expanded, not copied
                if all(st is states[0] for st in states):
                    return getattr(states[0], name)[None].expand(b, -1, -1)
                return torch.stack([getattr(st, name) for st in states])

            keys = stacked("keys")
            queries = tokens
            for i, block in enumerate(tr.layers):
                if block.skip_first_layer_pe:
                    queries = self._token_attention(block.self_attn, queries, queries, queries, key_valid)
                else:
                    q = queries + tokens
                    queries = queries + self._token_attention(block.self_attn, q, q, queries, key_valid)
                queries = block.norm1(queries)

                t2i, i2t = block.cross_attn_token_to_image, block.cross_attn_image_to_token
                if i == 0:
                    k_scaled, v, q_img = stacked("t2i_k"), stacked("t2i_v"), stacked("i2t_q")
                else:
                    k_scaled, v, q_img = self._image_projections(t2i, i2t, keys)
                queries = block.norm2(queries + self._token_to_image_batch(t2i, queries + tokens, k_scaled, v))
                queries = block.norm3(queries + block.mlp(queries))
                q = queries + tokens
                keys = block.norm4(keys + self._image_to_token_batch(i2t, q_img, q, queries, key_valid))

            final = tr.final_attn_token_to_image
            keys_pe = keys + self.key_pe
            scale = 1.0 / math.sqrt(final.internal_dim // final.num_heads)
            attn = self._token_to_image_batch(final, queries + tokens, final.k_proj(keys_pe).mul_(scale),
                                              final.v_proj(keys))
            queries = tr.norm_final_attn(queries + attn)

            chosen = list(range(1, dec.num_mask_tokens)) if multimask else [0]
            hyper = torch.stack([dec.output_hypernetworks_mlps[t](queries[:, 1 + t]) for t in chosen], dim=-1)  # (B, c2, M)
            iou = dec.iou_prediction_head(queries[:, 0])[:, chosen]  # (B, M)
            # One prompt at a time: the upscaled tensors of several (B x 65536 x 32 floats) leave the
            # CPU's caches, and the batched upscaling took 33 ms for three prompts against 14 ms here.
            return torch.stack([self._upscale_and_mask(keys[i], hyper[i]) for i in range(b)]), iou

    def _upscale_and_mask(self, keys: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Image tokens (..., HW, D) and hypernetwork vectors (..., c2, M) -> logits (..., M, 4h, 4w)."""
        h, w = self.grid
        up = self.decoder.output_upscaling
        conv1, norm, conv2 = up[0], up[1], up[3]
        c1, c2 = conv1.out_channels, conv2.out_channels
        lead = keys.shape[:-2]
        # ConvTranspose2d(k=2, s=2) weight (C_in, C_out, 2, 2) -> (4 * C_out, C_in), rows (dy, dx, c).
        w1 = conv1.weight.permute(2, 3, 1, 0).reshape(-1, conv1.in_channels)
        w2 = conv2.weight.permute(2, 3, 1, 0).reshape(-1, conv2.in_channels)
        up1 = F.linear(keys, w1, conv1.bias.repeat(4)).view(*lead, -1, c1)  # (HW*4, c1): pixel (i, j, dy, dx)
        up1 = F.gelu(F.layer_norm(up1, (c1,), norm.weight, norm.bias, norm.eps))
        up2 = F.gelu(F.linear(up1, w2, conv2.bias.repeat(4)).view(*lead, -1, c2))  # (HW*16, c2)
        masks = up2 @ hyper  # (HW*16, M), rows (i, j, dy1, dx1, dy2, dx2)
        m, k = masks.shape[-1], len(lead)
        masks = masks.view(*lead, h, w, 2, 2, 2, 2, m)  # (i, j, dy1, dx1, dy2, dx2, M) after the lead
        masks = masks.permute(*range(k), k + 6, k, k + 2, k + 4, k + 1, k + 3, k + 5)  # (M, i, dy1, dy2, j, dx1, dx2)
        return masks.reshape(*lead, m, 4 * h, 4 * w)
