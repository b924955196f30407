using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.StableDiffusion;

/// <summary>
/// How the ControlNet's features steer the frozen UNet. <see cref="Add"/> is DiffBIR's IRControlNet; the two others
/// are the variants of the DiffBIR lab seed, for which no official code exists — this is our reading of them:
/// <list type="bullet">
/// <item><b>Variant 5, "concat features"</b> (<see cref="ConcatFeatures"/>): the control reaches the middle block,
/// the skip features AND the decoder features. At output block j the official input is cat[h, F_k + c_k]
/// (k = N−1−j); here it is cat[h + d_k, F_k + c_k], where d_k = Z_k(ControlNet feature k) comes from an extra
/// zero-initialised 1×1 conv (<c>decoder_convs.k</c>) that maps to the decoder's channel count (which differs from
/// the skip's at level transitions). Equivalently: the control is a concatenated feature [d_k, c_k] added to the
/// concatenated [h, F_k]. The middle block gets + c_mid as in the official code.</item>
/// <item><b>Variant 6, SFT</b> (<see cref="Sft"/>; spatial feature transform, Wang et al. 2018): the skip features are
/// modulated, F_k ⊙ (1 + γ_k) + β_k, and likewise the middle block's output. β_k is the official zero conv's output
/// (<c>zero_convs.k</c>, so γ = 0 reproduces IRControlNet exactly and official checkpoints load into it) and γ_k comes
/// from a second zero-initialised 1×1 conv on the same ControlNet feature (<c>gamma_convs.k</c>,
/// <c>middle_block_gamma</c>). Because γ's conv sees the (non-zero) ControlNet feature, its weights get gradients at
/// initialisation even though γ = 0.</item>
/// </list>
/// All three return the plain UNet's output while their zero convs are zero (the ControlNet starts as a no-op).
/// </summary>
public enum ControlMode
{
    /// <summary>Official IRControlNet: h_mid + c_mid; cat[h, F_k + c_k].</summary>
    Add,
    /// <summary>Variant 5: cat[h + d_k, F_k + c_k]; h_mid + c_mid.</summary>
    ConcatFeatures,
    /// <summary>Variant 6: cat[h, F_k ⊙ (1 + γ_k) + β_k]; h_mid ⊙ (1 + γ_mid) + β_mid.</summary>
    Sft,
}

/// <summary>
/// What the ControlNet hands to the UNet: one residual per input block plus the middle one (official list
/// <c>outs</c>, last = middle), and, for the variants, the decoder controls (V5) or the SFT scales γ (V6).
/// Owns its tensors.
/// </summary>
public sealed class ControlSignal : IDisposable
{
    public ControlMode Mode { get; }
    /// <summary>c_k (β_k for SFT); index = input block, last = middle block. Official ControlNet output.</summary>
    public IReadOnlyList<Tensor> Residuals { get; }
    /// <summary>V5 only: d_k for the decoder feature concatenated with skip k (no middle entry).</summary>
    public IReadOnlyList<Tensor>? Decoder { get; }
    /// <summary>V6 only: γ_k, same indexing as <see cref="Residuals"/> (last = middle).</summary>
    public IReadOnlyList<Tensor>? Gamma { get; }

    public ControlSignal(ControlMode mode, IReadOnlyList<Tensor> residuals, IReadOnlyList<Tensor>? decoder = null, IReadOnlyList<Tensor>? gamma = null)
    {
        if (mode == ControlMode.ConcatFeatures && (decoder == null || decoder.Count != residuals.Count - 1))
            throw new ArgumentException("ConcatFeatures needs one decoder control per input block");
        if (mode == ControlMode.Sft && (gamma == null || gamma.Count != residuals.Count))
            throw new ArgumentException("Sft needs one γ per residual");
        Mode = mode; Residuals = residuals; Decoder = decoder; Gamma = gamma;
    }

    /// <summary>
    /// Official <c>ControlLDM.forward</c>: <c>[c * scale for c, scale in zip(control, control_scales)]</c> — control k
    /// times scales[k] (13 scales for SD 2.1; for a smaller net the extra scales are unused). For the variants every
    /// tensor derived from control k (d_k, γ_k) is scaled by the same factor, so scale 0 turns the control off.
    /// </summary>
    public ControlSignal Scaled(IReadOnlyList<double> scales)
    {
        if (scales.Count < Residuals.Count)
            throw new ArgumentException($"{scales.Count} control scales for {Residuals.Count} controls");
        return new ControlSignal(Mode,
            Residuals.Select((c, k) => c * scales[k]).ToList(),
            Decoder?.Select((d, k) => d * scales[k]).ToList(),
            Gamma?.Select((g, k) => g * scales[k]).ToList());
    }

    internal Tensor ApplyToMiddle(Tensor h) => Mode == ControlMode.Sft
        ? h * (Gamma![^1] + 1) + Residuals[^1]
        : h + Residuals[^1];

    /// <summary>(decoder feature, skip feature) after control k, ready for concatenation.</summary>
    internal (Tensor H, Tensor Skip) ApplyToSkip(int k, Tensor h, Tensor skip) => Mode switch
    {
        ControlMode.Add => (h, skip + Residuals[k]),
        ControlMode.ConcatFeatures => (h + Decoder![k], skip + Residuals[k]),
        ControlMode.Sft => (h, skip * (Gamma![k] + 1) + Residuals[k]),
        _ => throw new InvalidOperationException(Mode.ToString()),
    };

    public void Dispose()
    {
        foreach (var t in Residuals) t.Dispose();
        if (Decoder != null) foreach (var t in Decoder) t.Dispose();
        if (Gamma != null) foreach (var t in Gamma) t.Dispose();
    }
}

/// <summary>
/// DiffBIR's IRControlNet (official <c>ControlNet</c>, diffbir/model/controlnet.py): a trainable copy of the UNet
/// encoder + middle block whose first conv takes the noisy latent concatenated with the condition latent
/// (in_channels + hint_channels = 8 — the "hint" is concatenated to x, there is no separate hint encoder), and a
/// zero-initialised 1×1 conv after every input block (zero_convs, 12 for SD 2.1) and after the middle block
/// (middle_block_out). Official keys: schema/controlnet.json (324 tensors, 363,153,280 parameters). The variants'
/// extra convs (<c>decoder_convs</c>, <c>gamma_convs</c>, <c>middle_block_gamma</c>) exist only in their modes.
/// </summary>
public sealed class ControlNet : nn.Module<Tensor, Tensor, Tensor, Tensor, ControlSignal>
{
    public Sequential time_embed;
    public ModuleList<TimestepEmbedSequential> input_blocks;
    public ModuleList<TimestepEmbedSequential> zero_convs;
    public TimestepEmbedSequential middle_block;
    public TimestepEmbedSequential middle_block_out;
    /// <summary>V5 only: zero 1×1 convs, ControlNet feature k → decoder channels at skip k.</summary>
    public ModuleList<TimestepEmbedSequential>? decoder_convs;
    /// <summary>V6 only: zero 1×1 convs giving γ_k.</summary>
    public ModuleList<TimestepEmbedSequential>? gamma_convs;
    /// <summary>V6 only: γ for the middle block.</summary>
    public TimestepEmbedSequential? middle_block_gamma;

    public UNetConfig Config { get; }
    public ControlMode Mode { get; }
    /// <summary>Official <c>self.dtype</c> (see <see cref="UNetModel.Dtype"/>).</summary>
    public ScalarType Dtype { get; private set; }

    public ControlNet(UNetConfig? config = null, ControlMode mode = ControlMode.Add) : base(nameof(ControlNet))
    {
        var cfg = Config = config ?? UNetConfig.Sd21;
        Mode = mode;
        Dtype = cfg.UseFp16 ? ScalarType.Float16 : ScalarType.Float32;
        int mc = cfg.ModelChannels, ted = cfg.TimeEmbedDim;
        time_embed = nn.Sequential(("0", nn.Linear(mc, ted)), ("1", nn.SiLU()), ("2", nn.Linear(ted, ted)));

        var inputs = new List<TimestepEmbedSequential> { new(nn.Conv2d(cfg.InChannels + cfg.HintChannels, mc, 3, padding: 1)) };
        int ch = mc, ds = 1;
        for (int level = 0; level < cfg.ChannelMult.Length; level++)
        {
            for (int i = 0; i < cfg.NumResBlocks; i++)
            {
                int outCh = cfg.ChannelMult[level] * mc;
                var layers = new List<nn.Module> { new ResBlock(ch, ted, outCh, cfg.Dropout) };
                ch = outCh;
                if (cfg.AttentionResolutions.Contains(ds)) layers.Add(UNetModel.Transformer(cfg, ch));
                inputs.Add(new TimestepEmbedSequential(layers.ToArray()));
            }
            if (level != cfg.ChannelMult.Length - 1)
            {
                inputs.Add(new TimestepEmbedSequential(new Downsample(ch, ch)));
                ds *= 2;
            }
        }
        input_blocks = new ModuleList<TimestepEmbedSequential>(inputs.ToArray());
        var chans = cfg.InputBlockChannels();
        zero_convs = new ModuleList<TimestepEmbedSequential>(chans.Select(c => ZeroConv(c, c)).ToArray());
        middle_block = UNetModel.MiddleBlock(cfg, ch);
        middle_block_out = ZeroConv(ch, ch);
        if (mode == ControlMode.ConcatFeatures)
        {
            var dec = cfg.DecoderChannelsAtSkip();
            decoder_convs = new ModuleList<TimestepEmbedSequential>(chans.Select((c, k) => ZeroConv(c, dec[k])).ToArray());
        }
        else if (mode == ControlMode.Sft)
        {
            gamma_convs = new ModuleList<TimestepEmbedSequential>(chans.Select(c => ZeroConv(c, c)).ToArray());
            middle_block_gamma = ZeroConv(ch, ch);
        }
        RegisterComponents();
        if (Dtype != ScalarType.Float32) CastDtype(Dtype);
    }

    /// <summary>Official <c>make_zero_conv</c>: TimestepEmbedSequential(zero 1×1 conv), hence the keys <c>zero_convs.k.0.*</c>.</summary>
    static TimestepEmbedSequential ZeroConv(int inCh, int outCh) => new(SdNn.Zero(nn.Conv2d(inCh, outCh, 1)));

    /// <summary>
    /// Official <c>ControlLDM.load_controlnet_from_unet</c> (how IRControlNet starts training): every key the UNet also
    /// has is copied; a key whose shape differs (only <c>input_blocks.0.0.weight</c>, which also sees the hint
    /// channels) gets the UNet's weight followed by zeros for the extra input channels; the rest (zero convs and the
    /// variants' convs) keep their zero initialisation. Returns the two lists of keys like the official code.
    /// </summary>
    public (IReadOnlyList<string> InitWithNewZero, IReadOnlyList<string> InitWithScratch) LoadFromUNet(UNetModel unet)
    {
        var unetSd = unet.state_dict();
        var newZero = new List<string>();
        var scratch = new List<string>();
        using var _ = torch.no_grad();
        foreach (var (key, mine) in state_dict())
        {
            if (!unetSd.TryGetValue(key, out var target)) { scratch.Add(key); continue; }
            if (mine.shape.SequenceEqual(target.shape)) { mine.copy_(target); continue; }
            using var zeros = torch.zeros(mine.shape[0], mine.shape[1] - target.shape[1], mine.shape[2], mine.shape[3], dtype: target.dtype, device: target.device);
            using var padded = torch.cat(new[] { target, zeros }, 1);
            mine.copy_(padded);
            newZero.Add(key);
        }
        return (newZero, scratch);
    }

    /// <summary>Sets the attention implementation of every CrossAttention.</summary>
    public AttentionMode AttentionMode
    {
        set => SdNn.SetAttentionMode(this, value);
    }

    /// <summary>Official <c>ControlLDM.cast_dtype</c> for the ControlNet: blocks, zero convs (and the variants' convs); time_embed stays float32.</summary>
    public void CastDtype(ScalarType dtype)
    {
        Dtype = dtype;
        SdNn.CastBlocks(input_blocks, dtype);
        SdNn.CastBlocks(zero_convs, dtype);
        SdNn.CastBlocks(middle_block, dtype);
        SdNn.CastBlocks(middle_block_out, dtype);
        if (decoder_convs != null) SdNn.CastBlocks(decoder_convs, dtype);
        if (gamma_convs != null) SdNn.CastBlocks(gamma_convs, dtype);
        if (middle_block_gamma != null) SdNn.CastBlocks(middle_block_gamma, dtype);
    }

    /// <summary>
    /// Official <c>ControlNet.forward(x, hint, timesteps, context)</c>: h = cat(x, hint) through the encoder; after each
    /// input block k the zero conv gives c_k; the middle block's output gives c_mid. Returned unscaled.
    /// </summary>
    public override ControlSignal forward(Tensor x, Tensor hint, Tensor timesteps, Tensor context)
    {
        using var scope = torch.NewDisposeScope();
        var emb = time_embed.forward(SdNn.TimestepEmbedding(timesteps, Config.ModelChannels)).to_type(Dtype);
        var h = torch.cat(new[] { x, hint }, 1).to_type(Dtype);
        var ctx = context.to_type(Dtype);
        var outs = new List<Tensor>();
        var dec = decoder_convs != null ? new List<Tensor>() : null;
        var gam = gamma_convs != null ? new List<Tensor>() : null;
        for (int k = 0; k < input_blocks.Count; k++)
        {
            h = input_blocks[k].forward(h, emb, ctx);
            outs.Add(zero_convs[k].forward(h, emb, ctx));
            dec?.Add(decoder_convs![k].forward(h, emb, ctx));
            gam?.Add(gamma_convs![k].forward(h, emb, ctx));
        }
        h = middle_block.forward(h, emb, ctx);
        outs.Add(middle_block_out.forward(h, emb, ctx));
        gam?.Add(middle_block_gamma!.forward(h, emb, ctx));
        foreach (var t in outs.Concat(dec ?? new()).Concat(gam ?? new())) t.MoveToOuterDisposeScope();
        return new ControlSignal(Mode, outs, dec, gam);
    }
}
