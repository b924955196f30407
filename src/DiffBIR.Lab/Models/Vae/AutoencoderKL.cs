using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.Vae;

/// <summary>
/// Encoder/decoder shape of the KL autoencoder (official <c>ddconfig</c> of <c>diffbir.model.vae</c>). Defaults are the
/// released Stable Diffusion 2.1 VAE (configs/inference/cldm.yaml <c>vae_cfg.ddconfig</c>, KL-f8).
/// </summary>
public sealed record VaeDdConfig
{
    public bool DoubleZ { get; init; } = true;
    public int ZChannels { get; init; } = 4;
    /// <summary>Only decides at which feature resolutions <see cref="AttnResolutions"/> apply; any input size works.</summary>
    public int Resolution { get; init; } = 256;
    public int InChannels { get; init; } = 3;
    public int OutCh { get; init; } = 3;
    public int Ch { get; init; } = 128;
    public int[] ChMult { get; init; } = { 1, 2, 4, 4 };
    public int NumResBlocks { get; init; } = 2;
    /// <summary>Empty for SD: the only attention is the middle block's <c>mid.attn_1</c>, which always exists.</summary>
    public int[] AttnResolutions { get; init; } = Array.Empty<int>();
    /// <summary>Dropout is the identity at inference; kept for the config's sake.</summary>
    public double Dropout { get; init; }
    /// <summary>Groups of every GroupNorm (official <c>Normalize</c>: 32, not configurable there; diffusers calls it
    /// <c>norm_num_groups</c>). Only the tiny VAE changes it: with 32 channels, 32 groups normalise each channel alone,
    /// so the decoder's last norm erases every per-channel offset (the image's colours) and the network cannot learn.</summary>
    public int NormGroups { get; init; } = 32;
    /// <summary>Whether the encoder and the decoder have their last GroupNorm (<c>norm_out</c>, before swish and
    /// <c>conv_out</c>). Official: always. It is the only normalisation on the main path of either network (every other
    /// norm sits on a residual branch), and it removes each group's mean and scale over the whole image: the decoder
    /// must then carry an image's colours as patterns across the channels of a group. SD's VAE learns that over
    /// hundreds of thousands of steps; the tiny VAE trained for minutes does not (its round trips came out grey), so the
    /// tiny config sets <c>"norm_out": false</c> — swish and conv_out then follow the last block directly, and the
    /// state dict has no <c>norm_out</c> keys.</summary>
    public bool NormOut { get; init; } = true;

    public static VaeDdConfig FromJson(JsonNode n) => new()
    {
        DoubleZ = (bool?)n["double_z"] ?? true,
        ZChannels = (int)n["z_channels"]!,
        Resolution = (int)n["resolution"]!,
        InChannels = (int)n["in_channels"]!,
        OutCh = (int)n["out_ch"]!,
        Ch = (int)n["ch"]!,
        ChMult = n["ch_mult"]!.AsArray().Select(x => (int)x!).ToArray(),
        NumResBlocks = (int)n["num_res_blocks"]!,
        AttnResolutions = n["attn_resolutions"]?.AsArray().Select(x => (int)x!).ToArray() ?? Array.Empty<int>(),
        Dropout = (double?)n["dropout"] ?? 0.0,
        NormGroups = (int?)n["norm_num_groups"] ?? 32,
        NormOut = (bool?)n["norm_out"] ?? true,
    };
}

/// <summary>Official <c>vae_cfg</c>: the autoencoder plus the latent scale ControlLDM applies around it.</summary>
public sealed record VaeConfig
{
    public int EmbedDim { get; init; } = 4;
    public VaeDdConfig DdConfig { get; init; } = new();
    /// <summary>Stable Diffusion's latent scale (ControlLDM <c>latent_scale_factor</c>): z_unet = 0.18215 · z_vae.</summary>
    public double LatentScaleFactor { get; init; } = 0.18215;

    /// <summary>The released SD 2.1 VAE (83,653,863 values).</summary>
    public static VaeConfig Sd21 { get; } = new();

    /// <summary>Reads <c>{"embed_dim", "ddconfig", "latent_scale_factor"?}</c> (a fixture config or a cldm.yaml vae_cfg as JSON).</summary>
    public static VaeConfig FromJson(JsonNode n) => new()
    {
        EmbedDim = (int)n["embed_dim"]!,
        DdConfig = VaeDdConfig.FromJson(n["ddconfig"]!),
        LatentScaleFactor = (double?)n["latent_scale_factor"] ?? 0.18215,
    };
}

/// <summary>Shared pieces of the LDM autoencoder (official vae.py helpers).</summary>
static class VaeOps
{
    /// <summary>GroupNorm with 32 groups and eps 1e-6 (official <c>Normalize</c>; note the eps differs from torch's 1e-5).</summary>
    public static GroupNorm Normalize(long channels, int groups = 32) => nn.GroupNorm(groups, channels, eps: 1e-6, affine: true);

    /// <summary>swish, written as x·σ(x) like the official <c>nonlinearity</c> (silu may round differently).</summary>
    public static Tensor Swish(Tensor x) => x * torch.sigmoid(x);

    /// <summary>
    /// swish of a tensor the caller owns and no longer needs: in place (x ← x·σ(x), the same values as
    /// <see cref="Swish"/>) when autograd is off, so a full-resolution decoder level holds one copy fewer; with
    /// autograd on (rgb-space guidance differentiates through the decoder) x is saved for the backward pass, so a new
    /// tensor is made and x is freed.
    /// </summary>
    public static Tensor SwishOwned(Tensor x)
    {
        if (!torch.is_grad_enabled() && x.is_contiguous() && x.dim() >= 2)
        {
            // σ(x) of a 512² decoder level is itself 256 MiB: work through the channels in slices of at most
            // 4 Mi elements so that only a slice's σ exists at a time (elementwise, so the values do not change).
            long perChannel = x.numel() / Math.Max(1, x.shape[0] * x.shape[1]);
            long channels = x.shape[1], step = Math.Max(1, (4L << 20) / Math.Max(1, perChannel * x.shape[0]));
            for (long c0 = 0; c0 < channels; c0 += step)
            {
                using var slice = x.narrow(1, c0, Math.Min(step, channels - c0));
                using var sg = torch.sigmoid(slice);
                slice.mul_(sg);
            }
            return x;
        }
        using var s = torch.sigmoid(x);
        var y = x * s;
        x.Dispose();
        return y;
    }

    /// <summary>Replaces <paramref name="h"/> by <paramref name="next"/>, freeing h unless it is <paramref name="keep"/> (the caller's input).</summary>
    public static Tensor Advance(Tensor h, Tensor next, Tensor keep)
    {
        if (!ReferenceEquals(h, keep) && !ReferenceEquals(h, next)) h.Dispose();
        return next;
    }
}

/// <summary>Pre-activation residual block without a time embedding (official <c>ResnetBlock</c>, temb_channels=0).</summary>
public sealed class ResnetBlock : nn.Module<Tensor, Tensor>
{
    readonly GroupNorm norm1, norm2;
    readonly Conv2d conv1, conv2;
    /// <summary>1×1 projection of the skip path, present only when the channel count changes.</summary>
    readonly Conv2d? nin_shortcut;

    public ResnetBlock(long inChannels, long outChannels, int groups = 32) : base(nameof(ResnetBlock))
    {
        norm1 = VaeOps.Normalize(inChannels, groups);
        conv1 = nn.Conv2d(inChannels, outChannels, 3, stride: 1, padding: 1);
        norm2 = VaeOps.Normalize(outChannels, groups);
        conv2 = nn.Conv2d(outChannels, outChannels, 3, stride: 1, padding: 1);
        if (inChannels != outChannels) nin_shortcut = nn.Conv2d(inChannels, outChannels, 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        // Every intermediate is freed as soon as the next one exists (a scope alone would hold them all until the
        // block ends: at 512² that is ~1 GiB per decoder block); the values are those of the plain expression.
        using var scope = torch.NewDisposeScope();
        var a = VaeOps.SwishOwned(norm1.forward(x));
        var h = conv1.Run(a); a.Dispose();
        a = VaeOps.SwishOwned(norm2.forward(h)); h.Dispose();
        h = conv2.Run(a); a.Dispose();
        if (nin_shortcut is null) return (x + h).MoveToOuterDisposeScope();
        using var skip = nin_shortcut.Run(x);
        return (skip + h).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Single-head spatial self-attention with 1×1-conv projections (official <c>AttnBlock</c> / <c>SDPAttnBlock</c>;
/// both compute softmax(qᵀk/√C)·v over the H·W positions). We call scaled_dot_product_attention, which is what the
/// official code runs by default on torch ≥ 2 (the fixtures used the vanilla bmm path; the two agree to rounding) and
/// avoids materialising the (HW)² matrix when a memory-efficient kernel is available.
/// </summary>
public sealed class AttnBlock : nn.Module<Tensor, Tensor>
{
    readonly GroupNorm norm;
    readonly Conv2d q, k, v, proj_out;

    /// <summary>Score-matrix size (batch × tokens²) above which the attention's tokens are made contiguous (see
    /// forward): 2²⁷ elements = 512 MiB of float32 scores, reached at about 1450² px. Per thread, for tests.</summary>
    [ThreadStatic] static long? _flashAbove;
    public static long FlashAboveScoreElements { get => _flashAbove ?? (1L << 27); set => _flashAbove = value; }

    public AttnBlock(long channels, int groups = 32) : base(nameof(AttnBlock))
    {
        norm = VaeOps.Normalize(channels, groups);
        q = nn.Conv2d(channels, channels, 1);
        k = nn.Conv2d(channels, channels, 1);
        v = nn.Conv2d(channels, channels, 1);
        proj_out = nn.Conv2d(channels, channels, 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var h = norm.forward(x);
        long b = x.shape[0], c = x.shape[1], hh = x.shape[2], ww = x.shape[3];
        // b c h w -> b 1 (h w) c : one head whose width is the channel count. As a transposed view libtorch's CPU
        // kernel choice falls to the math path, which builds the whole (h w)² score matrix: 26.8 GB for the latent of a
        // 2560×2048 image. Above FlashAboveScoreElements scores the tokens are made contiguous, which lets the CPU
        // flash kernel run in O(h w) memory (same values up to rounding); below it the path is unchanged, so every
        // fixture-sized and 512² result, and the trained tiny weights' reproduction, stay bit-identical.
        bool contiguous = b * hh * ww * hh * ww > FlashAboveScoreElements;
        Tensor Tokens(Tensor t) { var r = t.reshape(b, 1, c, hh * ww).transpose(2, 3); return contiguous ? r.contiguous() : r; }
        var o = nn.functional.scaled_dot_product_attention(Tokens(q.Run(h)), Tokens(k.Run(h)), Tokens(v.Run(h)));
        o = o.transpose(2, 3).reshape(b, c, hh, ww);
        return (x + proj_out.Run(o)).MoveToOuterDisposeScope();
    }
}

/// <summary>Stride-2 3×3 conv after padding ONE zero row/column at the bottom/right only (official <c>Downsample</c>).</summary>
public sealed class Downsample : nn.Module<Tensor, Tensor>
{
    readonly Conv2d conv;

    public Downsample(long channels) : base(nameof(Downsample))
    {
        conv = nn.Conv2d(channels, channels, 3, stride: 2, padding: 0L);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var padded = nn.functional.pad(x, new long[] { 0, 1, 0, 1 }, PaddingModes.Constant, 0);
        return conv.Run(padded);
    }
}

/// <summary>Nearest-neighbour ×2 then a 3×3 conv (official <c>Upsample</c>).</summary>
public sealed class Upsample : nn.Module<Tensor, Tensor>
{
    readonly Conv2d conv;

    public Upsample(long channels) : base(nameof(Upsample))
    {
        conv = nn.Conv2d(channels, channels, 3, stride: 1, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var up = nn.functional.interpolate(x, scale_factor: new[] { 2.0, 2.0 }, mode: InterpolationMode.Nearest);
        return conv.Run(up);
    }
}

/// <summary>One resolution level: <c>block</c> (ResnetBlocks), <c>attn</c> (empty for SD), and the resampler between levels.</summary>
public sealed class VaeLevel : nn.Module
{
    internal readonly ModuleList<nn.Module<Tensor, Tensor>> block;
    internal readonly ModuleList<nn.Module<Tensor, Tensor>> attn;
    internal readonly Downsample? downsample;
    internal readonly Upsample? upsample;

    internal VaeLevel(IEnumerable<nn.Module<Tensor, Tensor>> blocks, IEnumerable<nn.Module<Tensor, Tensor>> attns, Downsample? down, Upsample? up)
        : base(nameof(VaeLevel))
    {
        block = new ModuleList<nn.Module<Tensor, Tensor>>(blocks.ToArray());
        attn = new ModuleList<nn.Module<Tensor, Tensor>>(attns.ToArray());
        downsample = down;
        upsample = up;
        RegisterComponents();
    }

    /// <summary>The ResnetBlocks of this level, each followed by its attention when the level has one.</summary>
    internal Tensor Blocks(Tensor h)
    {
        var x = h;   // the caller's tensor: not ours to free
        for (int i = 0; i < block.Count; i++)
        {
            var next = block[i].forward(h);
            if (attn.Count > 0) { var a = attn[i].Run(next); next.Dispose(); next = a; }
            h = VaeOps.Advance(h, next, x);
        }
        return h;
    }
}

/// <summary>The bottleneck: ResnetBlock, self-attention, ResnetBlock (official <c>mid</c>; attn_1 exists even with no attn_resolutions).</summary>
public sealed class VaeMiddle : nn.Module<Tensor, Tensor>
{
    readonly ResnetBlock block_1;
    readonly AttnBlock attn_1;
    readonly ResnetBlock block_2;

    internal VaeMiddle(long channels, int groups = 32) : base(nameof(VaeMiddle))
    {
        block_1 = new ResnetBlock(channels, channels, groups);
        attn_1 = new AttnBlock(channels, groups);
        block_2 = new ResnetBlock(channels, channels, groups);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        using var h1 = block_1.forward(x);
        using var h2 = attn_1.Run(h1);
        return block_2.forward(h2).MoveToOuterDisposeScope();
    }
}

/// <summary>Image → 2·z_channels moments at 1/2^(levels−1) resolution (official <c>Encoder</c>).</summary>
public sealed class VaeEncoder : nn.Module<Tensor, Tensor>
{
    readonly Conv2d conv_in;
    readonly ModuleList<VaeLevel> down;
    readonly VaeMiddle mid;
    readonly GroupNorm? norm_out;
    readonly Conv2d conv_out;

    public VaeEncoder(VaeDdConfig c) : base(nameof(VaeEncoder))
    {
        conv_in = nn.Conv2d(c.InChannels, c.Ch, 3, stride: 1, padding: 1);
        var levels = new List<VaeLevel>();
        long blockIn = c.Ch;
        int res = c.Resolution;
        for (int level = 0; level < c.ChMult.Length; level++)
        {
            long blockOut = (long)c.Ch * c.ChMult[level];
            var blocks = new List<nn.Module<Tensor, Tensor>>();
            var attns = new List<nn.Module<Tensor, Tensor>>();
            for (int i = 0; i < c.NumResBlocks; i++)
            {
                blocks.Add(new ResnetBlock(blockIn, blockOut, c.NormGroups));
                blockIn = blockOut;
                if (c.AttnResolutions.Contains(res)) attns.Add(new AttnBlock(blockIn, c.NormGroups));
            }
            Downsample? ds = null;
            if (level != c.ChMult.Length - 1) { ds = new Downsample(blockIn); res /= 2; }
            levels.Add(new VaeLevel(blocks, attns, ds, null));
        }
        down = new ModuleList<VaeLevel>(levels.ToArray());
        mid = new VaeMiddle(blockIn, c.NormGroups);
        norm_out = c.NormOut ? VaeOps.Normalize(blockIn, c.NormGroups) : null;
        conv_out = nn.Conv2d(blockIn, c.DoubleZ ? 2L * c.ZChannels : c.ZChannels, 3, stride: 1, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        // Each level's input is freed once its output exists (see ResnetBlock).
        using var scope = torch.NewDisposeScope();
        var h = conv_in.Run(x);
        foreach (var level in down)
        {
            h = VaeOps.Advance(h, level.Blocks(h), x);
            if (level.downsample is not null) h = VaeOps.Advance(h, level.downsample.forward(h), x);
        }
        h = VaeOps.Advance(h, mid.forward(h), x);
        h = norm_out is null ? VaeOps.Advance(h, VaeOps.Swish(h), x) : VaeOps.Advance(h, VaeOps.SwishOwned(norm_out.forward(h)), x);
        return conv_out.Run(h).MoveToOuterDisposeScope();
    }
}

/// <summary>Latent → image (official <c>Decoder</c>): levels run from the deepest up, each with num_res_blocks+1 blocks.</summary>
public sealed class VaeDecoder : nn.Module<Tensor, Tensor>
{
    readonly Conv2d conv_in;
    readonly VaeMiddle mid;
    /// <summary>Indexed by level (up.0 = full resolution), although the forward pass walks it in reverse.</summary>
    readonly ModuleList<VaeLevel> up;
    readonly GroupNorm? norm_out;
    readonly Conv2d conv_out;

    public VaeDecoder(VaeDdConfig c) : base(nameof(VaeDecoder))
    {
        int n = c.ChMult.Length;
        long blockIn = (long)c.Ch * c.ChMult[n - 1];
        int res = c.Resolution >> (n - 1);
        conv_in = nn.Conv2d(c.ZChannels, blockIn, 3, stride: 1, padding: 1);
        mid = new VaeMiddle(blockIn, c.NormGroups);
        var levels = new VaeLevel[n];
        for (int level = n - 1; level >= 0; level--)
        {
            long blockOut = (long)c.Ch * c.ChMult[level];
            var blocks = new List<nn.Module<Tensor, Tensor>>();
            var attns = new List<nn.Module<Tensor, Tensor>>();
            for (int i = 0; i < c.NumResBlocks + 1; i++)
            {
                blocks.Add(new ResnetBlock(blockIn, blockOut, c.NormGroups));
                blockIn = blockOut;
                if (c.AttnResolutions.Contains(res)) attns.Add(new AttnBlock(blockIn, c.NormGroups));
            }
            Upsample? us = null;
            if (level != 0) { us = new Upsample(blockIn); res *= 2; }
            levels[level] = new VaeLevel(blocks, attns, null, us);
        }
        up = new ModuleList<VaeLevel>(levels);
        norm_out = c.NormOut ? VaeOps.Normalize(blockIn, c.NormGroups) : null;
        conv_out = nn.Conv2d(blockIn, c.OutCh, 3, stride: 1, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor z)
    {
        // Each level's input is freed once its output exists (see ResnetBlock): at 512² the scope would otherwise
        // hold every level's activations until the end, ~1.4 GiB more at the peak.
        using var scope = torch.NewDisposeScope();
        var h = conv_in.Run(z);
        h = VaeOps.Advance(h, mid.forward(h), z);
        for (int level = up.Count - 1; level >= 0; level--)
        {
            h = VaeOps.Advance(h, up[level].Blocks(h), z);
            if (up[level].upsample is not null) h = VaeOps.Advance(h, up[level].upsample!.forward(h), z);
        }
        h = norm_out is null ? VaeOps.Advance(h, VaeOps.Swish(h), z) : VaeOps.Advance(h, VaeOps.SwishOwned(norm_out.forward(h)), z);
        return conv_out.Run(h).MoveToOuterDisposeScope();
    }
}

/// <summary>
/// The posterior q(z|x) = N(μ, σ²) of the KL autoencoder (official <c>DiagonalGaussianDistribution</c>): the moments
/// are split in half along channels, and log σ² is clamped to [−30, 20] before σ is formed.
/// </summary>
public sealed class DiagonalGaussianDistribution : IDisposable
{
    public Tensor Mean { get; }
    /// <summary>log σ², clamped to [−30, 20].</summary>
    public Tensor LogVar { get; }
    /// <summary>σ = exp(½ log σ²).</summary>
    public Tensor Std { get; }
    /// <summary>σ² = exp(log σ²).</summary>
    public Tensor Var { get; }

    public DiagonalGaussianDistribution(Tensor moments)
    {
        var parts = moments.chunk(2, dim: 1);
        Mean = parts[0];
        LogVar = parts[1].clamp(-30.0, 20.0);
        parts[1].Dispose();
        Std = torch.exp(0.5 * LogVar);
        Var = torch.exp(LogVar);
    }

    /// <summary>μ (what DiffBIR uses for conditioning: <c>vae_encode(sample=False)</c>).</summary>
    public Tensor Mode() => Mean.alias();

    /// <summary>μ + σ·ε with the caller's standard-normal <paramref name="noise"/> (official draws torch.randn itself).</summary>
    public Tensor Sample(Tensor noise) => Mean + Std * noise;

    public void Dispose() { Mean.Dispose(); LogVar.Dispose(); Std.Dispose(); Var.Dispose(); }
}

/// <summary>
/// The KL-regularised autoencoder of Stable Diffusion (official <c>diffbir.model.vae.AutoencoderKL</c>, ControlLDM's
/// <c>vae</c>): x ∈ [−1, 1]^(3×H×W) ↔ z ∈ R^(4×H/8×W/8). State-dict keys equal the official ones
/// (<c>encoder.*</c>, <c>decoder.*</c>, <c>quant_conv.*</c>, <c>post_quant_conv.*</c>).
/// </summary>
public sealed class AutoencoderKL : nn.Module<Tensor, Tensor>
{
    readonly VaeEncoder encoder;
    readonly VaeDecoder decoder;
    readonly Conv2d quant_conv;
    readonly Conv2d post_quant_conv;

    public VaeConfig Config { get; }

    public AutoencoderKL(VaeConfig? config = null) : base(nameof(AutoencoderKL))
    {
        Config = config ?? VaeConfig.Sd21;
        var dd = Config.DdConfig;
        if (!dd.DoubleZ) throw new ArgumentException("AutoencoderKL needs ddconfig.double_z = true (the encoder outputs mean and log-variance)");
        encoder = new VaeEncoder(dd);
        decoder = new VaeDecoder(dd);
        quant_conv = nn.Conv2d(2L * dd.ZChannels, 2L * Config.EmbedDim, 1);
        post_quant_conv = nn.Conv2d(Config.EmbedDim, dd.ZChannels, 1);
        RegisterComponents();
    }

    /// <summary>q(z|x) for images in [−1, 1] (official <c>encode</c>).</summary>
    public DiagonalGaussianDistribution Encode(Tensor x)
    {
        Tensor moments;
        using (torch.NewDisposeScope()) moments = quant_conv.Run(encoder.forward(x)).MoveToOuterDisposeScope();
        using (moments) return new DiagonalGaussianDistribution(moments);
    }

    /// <summary>The 1×1 conv from encoder features to moments (used by the tiled encoder).</summary>
    internal Tensor quant_conv_forward(Tensor h) => quant_conv.Run(h);

    /// <summary>The 1×1 conv from latent to decoder input (used by the tiled decoder).</summary>
    internal Tensor post_quant_conv_forward(Tensor z) => post_quant_conv.Run(z);

    /// <summary>Image from an UNSCALED latent (official <c>decode</c>).</summary>
    public Tensor Decode(Tensor z)
    {
        using var scope = torch.NewDisposeScope();
        return decoder.forward(post_quant_conv.Run(z)).MoveToOuterDisposeScope();
    }

    /// <summary>
    /// The diffusion-space latent of an image: mode of q(z|x) times the latent scale (official
    /// <c>ControlLDM.vae_encode(image, sample=False)</c>, which DiffBIR uses for the condition c_img).
    /// </summary>
    public Tensor EncodeScaled(Tensor x, Tensor? noise = null)
    {
        using var posterior = Encode(x);
        return ToDiffusionLatent(posterior, noise);
    }

    /// <summary>
    /// The one place of the latent scale: the diffusion-space latent of a posterior, its mode (or the sample
    /// μ + σ·<paramref name="noise"/>) times <see cref="VaeConfig.LatentScaleFactor"/>.
    /// </summary>
    public Tensor ToDiffusionLatent(DiagonalGaussianDistribution posterior, Tensor? noise = null)
    {
        using var z = noise is null ? posterior.Mode() : posterior.Sample(noise);
        return z * Config.LatentScaleFactor;
    }

    /// <summary>The inverse of the latent scale: z / <see cref="VaeConfig.LatentScaleFactor"/> (the decoder's input).</summary>
    public Tensor FromDiffusionLatent(Tensor z) => z / Config.LatentScaleFactor;

    /// <summary>Image from a diffusion-space latent: decode(z / scale) (official <c>ControlLDM.vae_decode</c>).</summary>
    public Tensor DecodeScaled(Tensor z)
    {
        using var unscaled = FromDiffusionLatent(z);
        return Decode(unscaled);
    }

    /// <summary>Reconstruction through the posterior mode (official <c>forward(sample_posterior=False)</c>).</summary>
    public override Tensor forward(Tensor x)
    {
        using var posterior = Encode(x);
        return Decode(posterior.Mean);
    }
}
