using DiffBIR.Lab.Models.Stage1;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Models.Vae;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Diagnostics;

/// <summary>
/// The multiply-adds of a network for an input size, computed from its module tree alone: the walk follows the
/// forward pass at the level of spatial sizes and token counts, and takes every channel count, kernel, stride and
/// padding from the layers themselves. No forward runs, so the full-size networks can be built on the meta device
/// (no weights allocated) and counted in milliseconds — which matters because the meta device of the C++ libtorch
/// has no kernels for convolution, group/layer norm or SDPA (PyTorch registers those in Python), so a meta forward
/// with <see cref="FlopCounter"/>'s hooks is not possible.
/// <para>Each entry has the same root ("model"), layer name, kind and count as <see cref="FlopCounter"/> gives for a
/// real forward of the same network — the tests hold the two equal, layer by layer, on the fixture-sized networks, so
/// this walk cannot drift from the code that runs. What is counted is what <see cref="FlopCounter"/> counts.</para>
/// </summary>
public static class NetworkFlops
{
    /// <summary>The UNet on a [batch, C, h, w] latent with a text context of <paramref name="contextTokens"/> tokens.</summary>
    public static FlopReport UNet(UNetModel unet, long batch, long h, long w, long contextTokens = 77)
    {
        var t = new Walk(unet, batch, contextTokens);
        t.Linear("time_embed.0", batch);
        t.Linear("time_embed.2", batch);
        var skips = new Stack<(long H, long W)>();
        var s = (H: h, W: w);
        for (int i = 0; i < unet.input_blocks.Count; i++) { s = t.Tes($"input_blocks.{i}", unet.input_blocks[i], s); skips.Push(s); }
        s = t.Tes("middle_block", unet.middle_block, s);
        // Each output block sees cat(h, skip) at the same size; channels come from the layers' weights.
        for (int j = 0; j < unet.output_blocks.Count; j++) { skips.Pop(); s = t.Tes($"output_blocks.{j}", unet.output_blocks[j], s); }
        t.Conv("out.2", s);
        return t.Report();
    }

    /// <summary>The (IR)ControlNet on a [batch, C, h, w] latent plus its hint of the same size.</summary>
    public static FlopReport ControlNet(ControlNet net, long batch, long h, long w, long contextTokens = 77)
    {
        var t = new Walk(net, batch, contextTokens);
        t.Linear("time_embed.0", batch);
        t.Linear("time_embed.2", batch);
        var s = (H: h, W: w);
        for (int k = 0; k < net.input_blocks.Count; k++)
        {
            s = t.Tes($"input_blocks.{k}", net.input_blocks[k], s);
            t.Tes($"zero_convs.{k}", net.zero_convs[k], s);
            if (net.decoder_convs is { } dec) t.Tes($"decoder_convs.{k}", dec[k], s);
            if (net.gamma_convs is { } gam) t.Tes($"gamma_convs.{k}", gam[k], s);
        }
        s = t.Tes("middle_block", net.middle_block, s);
        t.Tes("middle_block_out", net.middle_block_out, s);
        if (net.middle_block_gamma is { } mg) t.Tes("middle_block_gamma", mg, s);
        return t.Report();
    }

    /// <summary>The VAE encoder (and quant_conv) on a [batch, 3, h, w] image.</summary>
    public static FlopReport VaeEncoder(AutoencoderKL vae, long batch, long h, long w)
    {
        var t = new Walk(vae, batch, 0);
        var s = t.Conv("encoder.conv_in", (h, w));
        for (int i = 0; t.Has($"encoder.down.{i}.block.0"); i++)
        {
            s = t.VaeBlocks($"encoder.down.{i}", s);
            // Official Downsample: pad one zero row and column at the bottom/right, then a stride-2 conv without padding.
            if (t.Has($"encoder.down.{i}.downsample.conv")) s = t.Conv($"encoder.down.{i}.downsample.conv", (s.H + 1, s.W + 1));
        }
        s = t.VaeMiddle("encoder.mid", s);
        s = t.Conv("encoder.conv_out", s);
        t.Conv("quant_conv", s);
        return t.Report();
    }

    /// <summary>The VAE decoder (and post_quant_conv) on a [batch, z, h, w] latent.</summary>
    public static FlopReport VaeDecoder(AutoencoderKL vae, long batch, long h, long w)
    {
        var t = new Walk(vae, batch, 0);
        var s = t.Conv("post_quant_conv", (h, w));
        s = t.Conv("decoder.conv_in", s);
        s = t.VaeMiddle("decoder.mid", s);
        int levels = 0;
        while (t.Has($"decoder.up.{levels}.block.0")) levels++;
        for (int i = levels - 1; i >= 0; i--)
        {
            s = t.VaeBlocks($"decoder.up.{i}", s);
            if (t.Has($"decoder.up.{i}.upsample.conv")) s = t.Conv($"decoder.up.{i}.upsample.conv", (2 * s.H, 2 * s.W));
        }
        t.Conv("decoder.conv_out", s);
        return t.Report();
    }

    /// <summary>BSRNet / RRDBNet on a [batch, 3, h, w] image.</summary>
    public static FlopReport RRDBNet(RRDBNet net, long batch, long h, long w)
    {
        var t = new Walk(net, batch, 0);
        var s = t.Conv("conv_first", (h, w));
        for (int i = 0; t.Has($"RRDB_trunk.{i}"); i++)
            foreach (var rdb in new[] { "RDB1", "RDB2", "RDB3" })
                for (int c = 1; c <= 5; c++) t.Conv($"RRDB_trunk.{i}.{rdb}.conv{c}", s);   // dense: channels grow, size does not
        t.Conv("trunk_conv", s);
        s = t.Conv("upconv1", (2 * s.H, 2 * s.W));
        if (t.Has("upconv2")) s = t.Conv("upconv2", (2 * s.H, 2 * s.W));
        s = t.Conv("HRconv", s);
        t.Conv("conv_last", s);
        return t.Report();
    }

    /// <summary>Follows spatial sizes through a network; every count uses the same formula as the hooks.</summary>
    sealed class Walk
    {
        readonly Dictionary<string, nn.Module> _m;
        readonly long _b, _ctx;
        readonly Dictionary<(string, FlopKind), long> _macs = new();
        readonly List<(string, FlopKind)> _order = new();

        public Walk(nn.Module root, long batch, long contextTokens)
        {
            _m = root.named_modules().ToDictionary(x => x.name, x => x.module);
            _b = batch; _ctx = contextTokens;
        }

        public bool Has(string name) => _m.ContainsKey(name);

        T Get<T>(string name) where T : nn.Module =>
            _m.TryGetValue(name, out var m) && m is T t ? t
                : throw new InvalidOperationException($"NetworkFlops: no {typeof(T).Name} named '{name}' in this network (the walk does not match its structure)");

        void Add(string name, FlopKind kind, long macs)
        {
            var key = (name, kind);
            if (!_macs.ContainsKey(key)) _order.Add(key);
            _macs[key] = _macs.GetValueOrDefault(key) + macs;
        }

        public FlopReport Report() => new(
            _order.Select(k => new FlopEntry("model", k.Item1, k.Item2, 1, _macs[k])).OrderBy(e => e.Module, StringComparer.Ordinal).ToList(),
            Array.Empty<string>());

        /// <summary>A conv on an input of spatial size <paramref name="s"/>; returns the output size.</summary>
        public (long H, long W) Conv(string name, (long H, long W) s)
        {
            var c = Get<Conv2d>(name);
            var w = c.weight!.shape;   // [C_out, C_in / groups, k_h, k_w]
            if (c.padding is null || c.padding_mode != PaddingModes.Zeros)
                throw new NotSupportedException($"NetworkFlops: {name} uses a padding type or mode the walk does not model");
            long Out(long n, int d) => (n + 2 * c.padding[d] - c.dilation[d] * (w[2 + d] - 1) - 1) / c.stride[d] + 1;
            var o = (H: Out(s.H, 0), W: Out(s.W, 1));
            Add(name, FlopKind.Convolution, _b * w[0] * o.H * o.W * w[1] * w[2] * w[3]);
            return o;
        }

        /// <summary>A linear layer applied to <paramref name="rows"/> vectors.</summary>
        public void Linear(string name, long rows)
        {
            var l = Get<Linear>(name);
            Add(name, FlopKind.Linear, rows * l.weight!.shape[0] * l.weight!.shape[1]);
        }

        /// <summary>A conv or a linear on H·W tokens, whichever the layer is (SpatialTransformer proj_in / proj_out).</summary>
        void ConvOrLinear(string name, (long H, long W) s)
        {
            if (_m[name] is Conv2d) Conv(name, s); else Linear(name, _b * s.H * s.W);
        }

        /// <summary>A TimestepEmbedSequential: its layers in order.</summary>
        public (long H, long W) Tes(string prefix, TimestepEmbedSequential tes, (long H, long W) s)
        {
            for (int i = 0; i < tes.Layers.Count; i++)
            {
                var name = $"{prefix}.{i}";
                s = tes.Layers[i] switch
                {
                    Models.StableDiffusion.ResBlock => ResBlock(name, s),
                    SpatialTransformer st => Transformer(name, st, s),
                    Models.StableDiffusion.Downsample => Conv(name + ".op", s),
                    Models.StableDiffusion.Upsample => Conv(name + ".conv", (2 * s.H, 2 * s.W)),
                    Conv2d => Conv(name, s),
                    var other => throw new NotSupportedException($"NetworkFlops: {name} is a {other.GetType().Name}, which the walk does not model"),
                };
            }
            return s;
        }

        (long H, long W) ResBlock(string name, (long H, long W) s)
        {
            var h = Conv(name + ".in_layers.2", s);
            Linear(name + ".emb_layers.1", _b);
            h = Conv(name + ".out_layers.3", h);
            if (_m[name + ".skip_connection"] is Conv2d) Conv(name + ".skip_connection", s);
            return h;
        }

        (long H, long W) Transformer(string name, SpatialTransformer st, (long H, long W) s)
        {
            long n = s.H * s.W;
            ConvOrLinear(name + ".proj_in", s);
            for (int k = 0; k < st.transformer_blocks.Count; k++)
            {
                var block = $"{name}.transformer_blocks.{k}";
                Attention(block + ".attn1", n, st.transformer_blocks[k].DisableSelfAttention ? _ctx : n);
                Attention(block + ".attn2", n, _ctx);
                Linear(block + ".ff.net.0.proj", _b * n);
                Linear(block + ".ff.net.2", _b * n);
            }
            ConvOrLinear(name + ".proj_out", s);
            return s;
        }

        /// <summary>CrossAttention with <paramref name="nq"/> queries and <paramref name="nk"/> keys per sample.</summary>
        void Attention(string name, long nq, long nk)
        {
            var a = Get<CrossAttention>(name);
            Linear(name + ".to_q", _b * nq);
            Linear(name + ".to_k", _b * nk);
            Linear(name + ".to_v", _b * nk);
            Add(name, FlopKind.Attention, 2 * _b * nq * nk * a.Heads * a.DimHead);
            Linear(name + ".to_out.0", _b * nq);
        }

        /// <summary>One VAE level's ResnetBlocks, each followed by its attention when the level has one.</summary>
        public (long H, long W) VaeBlocks(string level, (long H, long W) s)
        {
            for (int j = 0; Has($"{level}.block.{j}"); j++)
            {
                s = VaeResnet($"{level}.block.{j}", s);
                if (Has($"{level}.attn.{j}")) VaeAttention($"{level}.attn.{j}", s);
            }
            return s;
        }

        public (long H, long W) VaeMiddle(string name, (long H, long W) s)
        {
            s = VaeResnet(name + ".block_1", s);
            VaeAttention(name + ".attn_1", s);
            return VaeResnet(name + ".block_2", s);
        }

        (long H, long W) VaeResnet(string name, (long H, long W) s)
        {
            var h = Conv(name + ".conv2", Conv(name + ".conv1", s));
            if (Has(name + ".nin_shortcut")) Conv(name + ".nin_shortcut", s);
            return h;
        }

        void VaeAttention(string name, (long H, long W) s)
        {
            Get<AttnBlock>(name);
            foreach (var p in new[] { ".q", ".k", ".v" }) Conv(name + p, s);
            long n = s.H * s.W, c = Get<Conv2d>(name + ".q").weight!.shape[0];
            Add(name, FlopKind.Attention, 2 * _b * n * n * c);
            Conv(name + ".proj_out", s);
        }
    }
}
