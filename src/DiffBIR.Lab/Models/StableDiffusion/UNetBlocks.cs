using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.StableDiffusion;

// The building blocks of the Stable Diffusion 2.1 UNet as DiffBIR ships them (official diffbir/model/unet.py,
// attention.py, util.py at 3f8b530). Field names are the official state_dict keys; Sequential children are named
// "0", "1", … so that e.g. ResBlock.out_layers.3 is the zero-initialised conv of the official code.

/// <summary>
/// How cross-attention computes softmax(QKᵀ/√d)V. The official code picks one globally (<c>Config.attn_mode</c>):
/// xformers if installed, else PyTorch's SDPA (torch ≥ 2), else "vanilla". The golden fixtures were made with
/// <see cref="Vanilla"/>; in float32 both are the same mathematics and agree to rounding.
/// </summary>
public enum AttentionMode
{
    /// <summary><c>F.scaled_dot_product_attention</c> in the model's dtype (official default on torch ≥ 2).</summary>
    Sdp,
    /// <summary>
    /// Official <c>CrossAttention</c>: Q and K are cast to float32 (ATTN_PRECISION=fp32) for QKᵀ and the softmax.
    /// The official code then multiplies the float32 weights with V in V's dtype, which only works under CUDA
    /// autocast; we cast the weights to V's dtype first (a no-op in float32).
    /// </summary>
    Vanilla,
}

/// <summary>Helpers shared by the UNet and the ControlNet.</summary>
public static class SdNn
{
    /// <summary>Sets the attention implementation of every CrossAttention below <paramref name="root"/> (the official global <c>Config.attn_mode</c>).</summary>
    public static void SetAttentionMode(nn.Module root, AttentionMode mode)
    {
        foreach (var (_, m) in root.named_modules()) if (m is CrossAttention a) a.Mode = mode;
    }

    /// <summary>
    /// Sinusoidal timestep embedding (official <c>util.timestep_embedding</c>, repeat_only=False), always float32:
    /// freqs = exp(−ln(10000)·i/half), i = 0…half−1; emb = [cos(t·freqs), sin(t·freqs)] — cosines FIRST.
    /// </summary>
    public static Tensor TimestepEmbedding(Tensor timesteps, int dim, double maxPeriod = 10000)
    {
        using var scope = torch.NewDisposeScope();
        int half = dim / 2;
        // Same operation order as the official code so that float32 rounding matches: (−ln P · arange) / half.
        var freqs = torch.exp(torch.arange(0, half, dtype: ScalarType.Float32, device: timesteps.device) * (-Math.Log(maxPeriod)) / half);
        var args = timesteps.unsqueeze(1).to_type(ScalarType.Float32) * freqs.unsqueeze(0);
        var emb = torch.cat(new[] { torch.cos(args), torch.sin(args) }, dim: -1);
        if (dim % 2 == 1) emb = torch.cat(new[] { emb, torch.zeros_like(emb[.., ..1]) }, dim: -1);
        return emb.MoveToOuterDisposeScope();
    }

    /// <summary>Official <c>zero_module</c>: zeroes every parameter (ControlNet zero convs, ResBlock/UNet out convs, proj_out).</summary>
    public static T Zero<T>(T module) where T : nn.Module
    {
        using (torch.no_grad())
            foreach (var p in module.parameters()) p.zero_();
        return module;
    }

    /// <summary>
    /// Official <c>ControlLDM.cast_dtype</c> for one group of blocks: everything to <paramref name="dtype"/>, then every
    /// <see cref="GroupNorm32"/> back to float32 ("GroupNorm32 only works with float32"). The plain GroupNorm of
    /// <see cref="SpatialTransformer"/> is NOT a GroupNorm32 and is cast like the rest.
    /// </summary>
    public static void CastBlocks(nn.Module blocks, ScalarType dtype)
    {
        blocks.to(dtype);
        foreach (var (_, m) in blocks.named_modules())
            if (m is GroupNorm32) m.to(ScalarType.Float32);
    }
}

/// <summary>
/// Official <c>GroupNorm32</c> (<c>normalization(ch)</c>): 32 groups, eps 1e-5, computed in float32 and cast back to
/// the input's dtype — which is why half-precision UNets keep these layers (and their parameters) in float32.
/// </summary>
public sealed class GroupNorm32 : nn.Module<Tensor, Tensor>
{
    public readonly int NumGroups;
    public readonly double Eps;
    public Parameter weight;
    public Parameter bias;

    public GroupNorm32(long channels, int numGroups = 32, double eps = 1e-5) : base(nameof(GroupNorm32))
    {
        NumGroups = numGroups; Eps = eps;
        weight = new Parameter(torch.ones(channels));
        bias = new Parameter(torch.zeros(channels));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        if (x.dtype == ScalarType.Float32) return nn.functional.group_norm(x, NumGroups, weight, bias, Eps);
        using var xf = x.to_type(ScalarType.Float32);
        using var y = nn.functional.group_norm(xf, NumGroups, weight, bias, Eps);
        return y.to_type(x.dtype);
    }
}

/// <summary>A layer of a <see cref="TimestepEmbedSequential"/> that also takes the timestep embedding (official <c>TimestepBlock</c>).</summary>
public interface ITimestepBlock
{
    Tensor forward(Tensor x, Tensor emb);
}

/// <summary>
/// Official <c>TimestepEmbedSequential</c>: children "0", "1", … ; <see cref="ResBlock"/>s get the timestep embedding,
/// <see cref="SpatialTransformer"/>s the text context, everything else only x.
/// </summary>
public sealed class TimestepEmbedSequential : nn.Module<Tensor, Tensor, Tensor, Tensor>
{
    readonly List<nn.Module> _layers = new();

    public TimestepEmbedSequential(params nn.Module[] layers) : base(nameof(TimestepEmbedSequential))
    {
        for (int i = 0; i < layers.Length; i++)
        {
            _layers.Add(layers[i]);
            register_module(i.ToString(), layers[i]);
        }
    }

    public IReadOnlyList<nn.Module> Layers => _layers;

    /// <summary>x → layers; <paramref name="context"/> may be null for blocks without attention.</summary>
    public override Tensor forward(Tensor x, Tensor emb, Tensor context)
    {
        var h = x;
        foreach (var layer in _layers)
        {
            var next = layer switch
            {
                ITimestepBlock tb => tb.forward(h, emb),
                SpatialTransformer st => st.forward(h, context),
                nn.Module<Tensor, Tensor> m => m.Run(h),
                _ => throw new InvalidOperationException($"unsupported layer {layer.GetType().Name}"),
            };
            if (!ReferenceEquals(h, x)) h.Dispose();
            h = next;
        }
        return h;
    }
}

/// <summary>
/// Official <c>ResBlock</c> (use_scale_shift_norm=False, no up/down): h = in_layers(x) + emb_layers(emb);
/// out = skip_connection(x) + out_layers(h). out_layers.3 is zero-initialised (<c>zero_module</c>).
/// </summary>
public sealed class ResBlock : nn.Module<Tensor, Tensor, Tensor>, ITimestepBlock
{
    public Sequential in_layers;
    public Sequential emb_layers;
    public Sequential out_layers;
    public nn.Module<Tensor, Tensor> skip_connection;

    public ResBlock(long channels, long embChannels, long outChannels, double dropout = 0) : base(nameof(ResBlock))
    {
        in_layers = nn.Sequential(
            ("0", new GroupNorm32(channels)),
            ("1", nn.SiLU()),
            ("2", nn.Conv2d(channels, outChannels, 3, padding: 1)));
        emb_layers = nn.Sequential(
            ("0", nn.SiLU()),
            ("1", nn.Linear(embChannels, outChannels)));
        out_layers = nn.Sequential(
            ("0", new GroupNorm32(outChannels)),
            ("1", nn.SiLU()),
            ("2", nn.Dropout(dropout)),
            ("3", SdNn.Zero(nn.Conv2d(outChannels, outChannels, 3, padding: 1))));
        // use_conv=False: a 1×1 conv only when the channel count changes.
        skip_connection = outChannels == channels ? nn.Identity() : nn.Conv2d(channels, outChannels, 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor emb)
    {
        using var scope = torch.NewDisposeScope();
        var h = in_layers.forward(x);
        // The timestep embedding is cast to the features' dtype (official `.type(h.dtype)`).
        var embOut = emb_layers.forward(emb).to_type(h.dtype).unsqueeze(-1).unsqueeze(-1);
        h = out_layers.forward(h + embOut);
        return (skip_connection.Run(x) + h).MoveToOuterDisposeScope();
    }
}

/// <summary>Official <c>Downsample</c> with conv_resample=True: a stride-2 3×3 conv named <c>op</c>.</summary>
public sealed class Downsample : nn.Module<Tensor, Tensor>
{
    public Conv2d op;

    public Downsample(long channels, long outChannels) : base(nameof(Downsample))
    {
        op = nn.Conv2d(channels, outChannels, 3, stride: 2, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => op.Run(x);
}

/// <summary>Official <c>Upsample</c> with conv_resample=True: nearest ×2, then a 3×3 conv.</summary>
public sealed class Upsample : nn.Module<Tensor, Tensor>
{
    public Conv2d conv;

    public Upsample(long channels, long outChannels) : base(nameof(Upsample))
    {
        conv = nn.Conv2d(channels, outChannels, 3, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var up = nn.functional.interpolate(x, scale_factor: new[] { 2.0, 2.0 }, mode: InterpolationMode.Nearest);
        return conv.Run(up);
    }
}

/// <summary>
/// Official <c>CrossAttention</c> (and its SDP twin): heads × dim_head, to_q/to_k/to_v without bias, to_out.0 with bias.
/// Self-attention when no context is given.
/// </summary>
public sealed class CrossAttention : nn.Module<Tensor, Tensor?, Tensor>
{
    public Linear to_q;
    public Linear to_k;
    public Linear to_v;
    public Sequential to_out;
    public readonly int Heads;
    public readonly int DimHead;
    /// <summary>Official <c>self.scale = dim_head ** -0.5</c>.</summary>
    public readonly double Scale;
    public AttentionMode Mode { get; set; } = AttentionMode.Sdp;

    public CrossAttention(long queryDim, long? contextDim, int heads, int dimHead, double dropout = 0) : base(nameof(CrossAttention))
    {
        long inner = (long)heads * dimHead;
        long ctx = contextDim ?? queryDim;
        Heads = heads; DimHead = dimHead; Scale = Math.Pow(dimHead, -0.5);
        to_q = nn.Linear(queryDim, inner, hasBias: false);
        to_k = nn.Linear(ctx, inner, hasBias: false);
        to_v = nn.Linear(ctx, inner, hasBias: false);
        to_out = nn.Sequential(("0", nn.Linear(inner, queryDim)), ("1", nn.Dropout(dropout)));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor? context)
    {
        using var scope = torch.NewDisposeScope();
        var c = context ?? x;
        long b = x.shape[0], n = x.shape[1];
        var q = Heads4(to_q.Run(x));
        var k = Heads4(to_k.Run(c));
        var v = Heads4(to_v.Run(c));
        Tensor o;
        if (Mode == AttentionMode.Vanilla)
        {
            // einsum("b i d, b j d -> b i j", q.float(), k.float()) * scale over (b h); softmax; einsum with v.
            var sim = torch.matmul(q.to_type(ScalarType.Float32), k.to_type(ScalarType.Float32).transpose(-2, -1)) * Scale;
            var w = sim.softmax(-1);
            o = torch.matmul(w.dtype == v.dtype ? w : w.to_type(v.dtype), v);
        }
        else
        {
            // [b, h, n, d]: libtorch's CPU flash-attention kernel takes only 4-D inputs; given the official 3-D
            // [(b h), n, d] layout it falls back to the math path, which materialises the n×n scores (two 640 MiB
            // tensors per attention of the UNet at a 64×64 latent with CFG).
            o = nn.functional.scaled_dot_product_attention(q, k, v);
        }
        // b h n d -> b n (h d)
        o = o.permute(0, 2, 1, 3).reshape(b, n, Heads * DimHead);
        return to_out.forward(o).MoveToOuterDisposeScope();
    }

    /// <summary>b n (h d) → b h n d (a view).</summary>
    Tensor Heads4(Tensor t)
    {
        long b = t.shape[0], n = t.shape[1];
        return t.reshape(b, n, Heads, DimHead).permute(0, 2, 1, 3);
    }
}

/// <summary>Official <c>GEGLU</c>: proj to 2·inner, split into (x, gate), x · GELU(gate) (exact erf GELU).</summary>
public sealed class GEGLU : nn.Module<Tensor, Tensor>
{
    public Linear proj;

    public GEGLU(long dimIn, long dimOut) : base(nameof(GEGLU))
    {
        proj = nn.Linear(dimIn, dimOut * 2);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = torch.NewDisposeScope();
        var parts = proj.Run(x).chunk(2, -1);
        return (parts[0] * nn.functional.gelu(parts[1])).MoveToOuterDisposeScope();
    }
}

/// <summary>Official <c>FeedForward</c> with glu=True, mult 4: net.0 = GEGLU, net.1 = Dropout, net.2 = Linear.</summary>
public sealed class FeedForward : nn.Module<Tensor, Tensor>
{
    public Sequential net;

    public FeedForward(long dim, int mult = 4, double dropout = 0) : base(nameof(FeedForward))
    {
        long inner = dim * mult;
        net = nn.Sequential(("0", new GEGLU(dim, inner)), ("1", nn.Dropout(dropout)), ("2", nn.Linear(inner, dim)));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => net.forward(x);
}

/// <summary>
/// Official <c>BasicTransformerBlock</c> (pre-norm): x += attn1(norm1 x) (self-attention), x += attn2(norm2 x, context)
/// (cross-attention on the text embedding), x += ff(norm3 x).
/// </summary>
public sealed class BasicTransformerBlock : nn.Module<Tensor, Tensor?, Tensor>
{
    public CrossAttention attn1;
    public FeedForward ff;
    public CrossAttention attn2;
    public LayerNorm norm1;
    public LayerNorm norm2;
    public LayerNorm norm3;
    readonly bool _disableSelfAttn;
    /// <summary>attn1 attends to the context instead of itself (official disable_self_attn).</summary>
    internal bool DisableSelfAttention => _disableSelfAttn;

    public BasicTransformerBlock(long dim, int heads, int dimHead, long? contextDim, bool disableSelfAttn = false, double dropout = 0)
        : base(nameof(BasicTransformerBlock))
    {
        _disableSelfAttn = disableSelfAttn;
        attn1 = new CrossAttention(dim, disableSelfAttn ? contextDim : null, heads, dimHead, dropout);
        ff = new FeedForward(dim, dropout: dropout);
        attn2 = new CrossAttention(dim, contextDim, heads, dimHead, dropout);
        norm1 = nn.LayerNorm(dim);
        norm2 = nn.LayerNorm(dim);
        norm3 = nn.LayerNorm(dim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor? context)
    {
        using var scope = torch.NewDisposeScope();
        x = attn1.Run(norm1.forward(x), _disableSelfAttn ? context : null) + x;
        x = attn2.Run(norm2.forward(x), context) + x;
        x = ff.forward(norm3.forward(x)) + x;
        return x.MoveToOuterDisposeScope();
    }
}

/// <summary>
/// Official <c>SpatialTransformer</c>: GroupNorm (plain, eps 1e-6 — not a GroupNorm32), proj_in, transformer blocks on
/// the (h·w) tokens, proj_out (zero-initialised), residual. With use_linear (SD 2.x) the projections are Linear layers
/// applied after flattening; note the official proj_out is <c>Linear(in_channels, inner_dim)</c> (arguments swapped,
/// harmless because they are equal in every config).
/// </summary>
public sealed class SpatialTransformer : nn.Module<Tensor, Tensor?, Tensor>
{
    public GroupNorm norm;
    public nn.Module<Tensor, Tensor> proj_in;
    public ModuleList<BasicTransformerBlock> transformer_blocks;
    public nn.Module<Tensor, Tensor> proj_out;
    readonly bool _useLinear;

    public SpatialTransformer(long channels, int heads, int dimHead, int depth, long? contextDim, bool useLinear, bool disableSelfAttn = false)
        : base(nameof(SpatialTransformer))
    {
        long inner = (long)heads * dimHead;
        _useLinear = useLinear;
        norm = nn.GroupNorm(32, channels, eps: 1e-6, affine: true);
        proj_in = useLinear ? nn.Linear(channels, inner) : nn.Conv2d(channels, inner, 1);
        transformer_blocks = new ModuleList<BasicTransformerBlock>(
            Enumerable.Range(0, depth).Select(_ => new BasicTransformerBlock(inner, heads, dimHead, contextDim, disableSelfAttn)).ToArray());
        proj_out = useLinear ? SdNn.Zero(nn.Linear(channels, inner)) : SdNn.Zero(nn.Conv2d(inner, channels, 1));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor? context)
    {
        using var scope = torch.NewDisposeScope();
        long b = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3];
        var t = norm.forward(x);
        if (!_useLinear) t = proj_in.Run(t);
        t = t.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous();     // b c h w -> b (h w) c
        if (_useLinear) t = proj_in.Run(t);
        foreach (var block in transformer_blocks) t = block.forward(t, context);
        if (_useLinear) t = proj_out.Run(t);
        t = t.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous();      // b (h w) c -> b c h w
        if (!_useLinear) t = proj_out.Run(t);
        return (t + x).MoveToOuterDisposeScope();
    }
}
