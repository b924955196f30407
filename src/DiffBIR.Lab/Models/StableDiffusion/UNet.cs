using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.StableDiffusion;

/// <summary>
/// Constructor arguments of the official <c>UNetModel</c> / <c>ControlNet</c> (configs/inference/cldm.yaml,
/// <c>unet_cfg</c> and <c>controlnet_cfg</c>). Defaults are the released SD 2.1 values. Only the options DiffBIR uses
/// are supported: spatial transformers with cross-attention, conv resampling, no scale-shift norm, no class labels.
/// </summary>
public sealed record UNetConfig
{
    public int InChannels { get; init; } = 4;
    /// <summary>UNet only (ignored by the ControlNet).</summary>
    public int OutChannels { get; init; } = 4;
    /// <summary>ControlNet only: channels of the condition latent concatenated to x (IRControlNet: the VAE latent of the stage-1 image).</summary>
    public int HintChannels { get; init; } = 4;
    public int ModelChannels { get; init; } = 320;
    public int NumResBlocks { get; init; } = 2;
    /// <summary>Downsampling rates (1, 2, 4, …) at which a SpatialTransformer follows each ResBlock.</summary>
    public int[] AttentionResolutions { get; init; } = { 4, 2, 1 };
    public int[] ChannelMult { get; init; } = { 1, 2, 4, 4 };
    public int NumHeads { get; init; } = -1;
    /// <summary>When set (≠ −1), heads = channels / NumHeadChannels (SD 2.x: 64).</summary>
    public int NumHeadChannels { get; init; } = 64;
    public int TransformerDepth { get; init; } = 1;
    public int ContextDim { get; init; } = 1024;
    public bool UseLinearInTransformer { get; init; } = true;
    public bool Legacy { get; init; } = false;
    public double Dropout { get; init; } = 0;
    /// <summary>Official <c>use_fp16</c>: the blocks' dtype is float16 (the released config leaves it False).</summary>
    public bool UseFp16 { get; init; } = false;

    /// <summary>Stable Diffusion 2.1 (released configs/inference/cldm.yaml).</summary>
    public static UNetConfig Sd21 { get; } = new();

    /// <summary>Reads an official config object (e.g. a fixture's <c>unet_cfg</c>); refuses options we do not implement.</summary>
    public static UNetConfig FromJson(JsonNode cfg)
    {
        var o = cfg.AsObject();
        static int[] Ints(JsonNode n) => n.AsArray().Select(x => (int)x!).ToArray();
        void Require(string key, Func<JsonNode, bool> ok, string what)
        {
            if (o.TryGetPropertyValue(key, out var v) && v != null && !ok(v))
                throw new NotSupportedException($"UNet config: {key}={v.ToJsonString()} is not supported ({what})");
        }
        Require("use_spatial_transformer", v => (bool)v!, "DiffBIR always uses spatial transformers");
        Require("use_scale_shift_norm", v => !(bool)v!, "SD uses plain ResBlocks");
        Require("resblock_updown", v => !(bool)v!, "SD resamples with convs");
        Require("conv_resample", v => (bool)v!, "SD resamples with convs");
        Require("dims", v => (int)v! == 2, "2-D only");
        Require("num_classes", _ => false, "no class-conditional UNet");
        Require("disable_self_attentions", _ => false, "not used by DiffBIR");
        Require("num_attention_blocks", _ => false, "not used by DiffBIR");
        var c = new UNetConfig();
        if (o["in_channels"] is { } ic) c = c with { InChannels = (int)ic };
        if (o["out_channels"] is { } oc) c = c with { OutChannels = (int)oc };
        if (o["hint_channels"] is { } hc) c = c with { HintChannels = (int)hc };
        if (o["model_channels"] is { } mc) c = c with { ModelChannels = (int)mc };
        if (o["num_res_blocks"] is { } nr) c = c with { NumResBlocks = (int)nr };
        if (o["attention_resolutions"] is { } ar) c = c with { AttentionResolutions = Ints(ar) };
        if (o["channel_mult"] is { } cm) c = c with { ChannelMult = Ints(cm) };
        c = c with { NumHeads = o["num_heads"] is { } nh ? (int)nh : -1, NumHeadChannels = o["num_head_channels"] is { } nhc ? (int)nhc : -1 };
        if (o["transformer_depth"] is { } td) c = c with { TransformerDepth = (int)td };
        if (o["context_dim"] is { } cd) c = c with { ContextDim = (int)cd };
        if (o["use_linear_in_transformer"] is { } ul) c = c with { UseLinearInTransformer = (bool)ul };
        if (o["legacy"] is { } lg) c = c with { Legacy = (bool)lg };
        if (o["dropout"] is { } dr) c = c with { Dropout = (double)dr };
        if (o["use_fp16"] is { } uf) c = c with { UseFp16 = (bool)uf };
        return c;
    }

    public int TimeEmbedDim => ModelChannels * 4;

    /// <summary>
    /// (heads, dim_head) of a SpatialTransformer on <paramref name="ch"/> channels — the official rule: with
    /// num_head_channels, heads = ch / num_head_channels; legacy recomputes dim_head = ch / heads.
    /// </summary>
    public (int Heads, int DimHead) HeadsFor(int ch)
    {
        int heads, dimHead;
        if (NumHeadChannels == -1) { heads = NumHeads; dimHead = ch / NumHeads; }
        else { heads = ch / NumHeadChannels; dimHead = NumHeadChannels; }
        if (Legacy) dimHead = ch / heads;
        return (heads, dimHead);
    }

    /// <summary>Channels of each input block's output (official <c>input_block_chans</c>): these are the skip features.</summary>
    public int[] InputBlockChannels()
    {
        var chans = new List<int> { ModelChannels };
        int ch = ModelChannels;
        for (int level = 0; level < ChannelMult.Length; level++)
        {
            for (int i = 0; i < NumResBlocks; i++) { ch = ChannelMult[level] * ModelChannels; chans.Add(ch); }
            if (level != ChannelMult.Length - 1) chans.Add(ch);
        }
        return chans.ToArray();
    }

    /// <summary>
    /// For each skip index k (= input block k), the channels of the decoder feature h that is concatenated with it,
    /// i.e. the input of output block N−1−k before concatenation: the middle block's for k = N−1, else the previous
    /// output block's output.
    /// </summary>
    public int[] DecoderChannelsAtSkip()
    {
        var skips = InputBlockChannels();
        int n = skips.Length;
        var atOutputBlock = new int[n];
        int ch = skips[^1];           // middle block keeps the last channel count
        int j = 0;
        for (int level = ChannelMult.Length - 1; level >= 0; level--)
            for (int i = 0; i <= NumResBlocks; i++)
            {
                atOutputBlock[j++] = ch;
                ch = ModelChannels * ChannelMult[level];
            }
        var result = new int[n];
        for (int k = 0; k < n; k++) result[k] = atOutputBlock[n - 1 - k];
        return result;
    }
}

/// <summary>
/// The Stable Diffusion 2.1 denoiser as DiffBIR uses it: official <c>ControlledUnetModel</c> (diffbir/model/controlnet.py),
/// i.e. <c>UNetModel</c> whose forward optionally adds ControlNet residuals. Keys: time_embed, input_blocks,
/// middle_block, output_blocks, out (schema/unet.json: 686 tensors, 865,910,724 parameters at SD 2.1 size).
/// </summary>
public sealed class UNetModel : nn.Module<Tensor, Tensor, Tensor, Tensor>
{
    public Sequential time_embed;
    public ModuleList<TimestepEmbedSequential> input_blocks;
    public TimestepEmbedSequential middle_block;
    public ModuleList<TimestepEmbedSequential> output_blocks;
    public Sequential @out;

    public UNetConfig Config { get; }

    /// <summary>
    /// Official <c>self.dtype</c>: the dtype of the blocks; x, emb and context are cast to it on entry and h back to
    /// x's dtype before <c>out</c>. Set by <see cref="CastDtype"/>.
    /// </summary>
    public ScalarType Dtype { get; private set; }

    public UNetModel(UNetConfig? config = null) : base(nameof(UNetModel))
    {
        var cfg = Config = config ?? UNetConfig.Sd21;
        Dtype = cfg.UseFp16 ? ScalarType.Float16 : ScalarType.Float32;
        int mc = cfg.ModelChannels, ted = cfg.TimeEmbedDim;
        time_embed = nn.Sequential(("0", nn.Linear(mc, ted)), ("1", nn.SiLU()), ("2", nn.Linear(ted, ted)));

        var inputs = new List<TimestepEmbedSequential> { new(nn.Conv2d(cfg.InChannels, mc, 3, padding: 1)) };
        var chans = new Stack<int>();
        chans.Push(mc);
        int ch = mc, ds = 1;
        for (int level = 0; level < cfg.ChannelMult.Length; level++)
        {
            for (int i = 0; i < cfg.NumResBlocks; i++)
            {
                int outCh = cfg.ChannelMult[level] * mc;
                var layers = new List<nn.Module> { new ResBlock(ch, ted, outCh, cfg.Dropout) };
                ch = outCh;
                if (cfg.AttentionResolutions.Contains(ds)) layers.Add(Transformer(cfg, ch));
                inputs.Add(new TimestepEmbedSequential(layers.ToArray()));
                chans.Push(ch);
            }
            if (level != cfg.ChannelMult.Length - 1)
            {
                inputs.Add(new TimestepEmbedSequential(new Downsample(ch, ch)));
                chans.Push(ch);
                ds *= 2;
            }
        }
        input_blocks = new ModuleList<TimestepEmbedSequential>(inputs.ToArray());
        middle_block = MiddleBlock(cfg, ch);

        var outputs = new List<TimestepEmbedSequential>();
        for (int level = cfg.ChannelMult.Length - 1; level >= 0; level--)
        {
            for (int i = 0; i <= cfg.NumResBlocks; i++)
            {
                int ich = chans.Pop();
                int outCh = mc * cfg.ChannelMult[level];
                var layers = new List<nn.Module> { new ResBlock(ch + ich, ted, outCh, cfg.Dropout) };
                ch = outCh;
                if (cfg.AttentionResolutions.Contains(ds)) layers.Add(Transformer(cfg, ch));
                if (level > 0 && i == cfg.NumResBlocks)
                {
                    layers.Add(new Upsample(ch, ch));
                    ds /= 2;
                }
                outputs.Add(new TimestepEmbedSequential(layers.ToArray()));
            }
        }
        output_blocks = new ModuleList<TimestepEmbedSequential>(outputs.ToArray());
        @out = nn.Sequential(
            ("0", new GroupNorm32(ch)),
            ("1", nn.SiLU()),
            ("2", SdNn.Zero(nn.Conv2d(mc, cfg.OutChannels, 3, padding: 1))));
        RegisterComponents();
        if (Dtype != ScalarType.Float32) CastDtype(Dtype);
    }

    internal static SpatialTransformer Transformer(UNetConfig cfg, int ch)
    {
        var (heads, dimHead) = cfg.HeadsFor(ch);
        return new SpatialTransformer(ch, heads, dimHead, cfg.TransformerDepth, cfg.ContextDim, cfg.UseLinearInTransformer);
    }

    internal static TimestepEmbedSequential MiddleBlock(UNetConfig cfg, int ch) => new(
        new ResBlock(ch, cfg.TimeEmbedDim, ch, cfg.Dropout),
        Transformer(cfg, ch),
        new ResBlock(ch, cfg.TimeEmbedDim, ch, cfg.Dropout));

    /// <summary>Sets the attention implementation of every CrossAttention (the official global <c>Config.attn_mode</c>).</summary>
    public AttentionMode AttentionMode
    {
        set => SdNn.SetAttentionMode(this, value);
    }

    /// <summary>
    /// Official <c>ControlLDM.cast_dtype</c> for the UNet: input/middle/output blocks to <paramref name="dtype"/>
    /// (GroupNorm32 back to float32); time_embed and out stay float32.
    /// </summary>
    public void CastDtype(ScalarType dtype)
    {
        Dtype = dtype;
        SdNn.CastBlocks(input_blocks, dtype);
        SdNn.CastBlocks(middle_block, dtype);
        SdNn.CastBlocks(output_blocks, dtype);
    }

    /// <summary>The plain UNet: ε (or v) for latent x at timesteps t with text context [B, 77, context_dim].</summary>
    public override Tensor forward(Tensor x, Tensor timesteps, Tensor context) => forward(x, timesteps, context, null);

    /// <summary>
    /// Official <c>ControlledUnetModel.forward</c>. With a control signal, the middle control is added to the middle
    /// block's output and control k to skip feature k (the official code pops both lists from the end, which pairs
    /// input block k with control k) before each concatenation; <see cref="ControlSignal.Mode"/> selects the
    /// variant (see <see cref="ControlMode"/>). <paramref name="onlyMidControl"/> = official only_mid_control.
    /// </summary>
    public Tensor forward(Tensor x, Tensor timesteps, Tensor context, ControlSignal? control, bool onlyMidControl = false)
    {
        using var scope = torch.NewDisposeScope();
        var emb = time_embed.forward(SdNn.TimestepEmbedding(timesteps, Config.ModelChannels)).to_type(Dtype);
        var h = x.to_type(Dtype);
        var ctx = context.to_type(Dtype);
        var hs = new List<Tensor>();
        foreach (var block in input_blocks)
        {
            h = block.forward(h, emb, ctx);
            hs.Add(h);
        }
        h = middle_block.forward(h, emb, ctx);
        if (control != null)
        {
            if (control.Residuals.Count != hs.Count + 1)
                throw new ArgumentException($"control has {control.Residuals.Count} residuals; this UNet needs {hs.Count + 1} (one per input block + middle)");
            h = control.ApplyToMiddle(h);
        }
        for (int j = 0; j < output_blocks.Count; j++)
        {
            int k = hs.Count - 1 - j;
            var skip = hs[k];
            var (hj, sj) = control == null || onlyMidControl ? (h, skip) : control.ApplyToSkip(k, h, skip);
            h = output_blocks[j].forward(torch.cat(new[] { hj, sj }, 1), emb, ctx);
        }
        h = h.to_type(x.dtype);
        return @out.forward(h).MoveToOuterDisposeScope();
    }
}
