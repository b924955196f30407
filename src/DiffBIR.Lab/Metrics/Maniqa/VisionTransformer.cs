using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Metrics.Maniqa;

/// <summary>timm <c>PatchEmbed</c>: a stride-p conv, flattened to tokens [B, (H/p)·(W/p), E] (no norm).</summary>
public sealed class VitPatchEmbed : nn.Module<Tensor, Tensor>
{
    readonly Conv2d proj;

    public VitPatchEmbed(int inChans, int embedDim, int patchSize) : base("PatchEmbed")
    {
        proj = nn.Conv2d(inChans, embedDim, patchSize, stride: patchSize);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var y = proj.forward(x);
        using var f = y.flatten(2);
        return f.transpose(1, 2).contiguous();
    }
}

/// <summary>timm <c>Attention</c> (non-fused path): softmax(q·scale·kᵀ)·v over heads, then <c>proj</c>.</summary>
public sealed class VitAttention : nn.Module<Tensor, Tensor>
{
    readonly Linear qkv, proj;
    readonly int numHeads;
    readonly double scale;

    public VitAttention(int dim, int numHeads) : base("Attention")
    {
        this.numHeads = numHeads;
        scale = Math.Pow(dim / numHeads, -0.5);
        qkv = nn.Linear(dim, dim * 3);
        proj = nn.Linear(dim, dim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], n = x.shape[1], c = x.shape[2];
        var t = qkv.forward(x).reshape(b, n, 3, numHeads, c / numHeads).permute(2, 0, 3, 1, 4);
        var q = t[0] * scale;
        var attn = q.matmul(t[1].transpose(-2, -1)).softmax(-1);
        var y = attn.matmul(t[2]).transpose(1, 2).reshape(b, n, c);
        return scope.MoveToOuter(proj.forward(y));
    }
}

/// <summary>timm <c>Mlp</c>: fc1 → exact (erf) GELU → fc2.</summary>
public sealed class VitMlp : nn.Module<Tensor, Tensor>
{
    readonly Linear fc1, fc2;

    public VitMlp(int dim, int hidden) : base("Mlp")
    {
        fc1 = nn.Linear(dim, hidden);
        fc2 = nn.Linear(hidden, dim);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var h = fc1.forward(x);
        using var a = nn.functional.gelu(h);
        return fc2.forward(a);
    }
}

/// <summary>timm <c>Block</c> (pre-norm, no layer scale): x + attn(norm1(x)), then + mlp(norm2(x)).</summary>
public sealed class VitBlock : nn.Module<Tensor, Tensor>
{
    readonly LayerNorm norm1, norm2;
    readonly VitAttention attn;
    readonly VitMlp mlp;

    public VitBlock(int dim, int numHeads, double mlpRatio) : base("Block")
    {
        norm1 = nn.LayerNorm(dim, eps: 1e-6);
        attn = new VitAttention(dim, numHeads);
        norm2 = nn.LayerNorm(dim, eps: 1e-6);
        mlp = new VitMlp(dim, (int)(dim * mlpRatio));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var y = x + attn.forward(norm1.forward(x));
        y = y + mlp.forward(norm2.forward(y));
        return scope.MoveToOuter(y);
    }
}

/// <summary>
/// timm <c>VisionTransformer</c> with a class token and a learned position embedding (the layout of
/// <c>vit_base_patch8_224</c>). Field names are the official keys (MANIQA prefixes them with <c>vit.</c>). MANIQA
/// reads the outputs of blocks 6..9 through forward hooks and discards the ViT's own output, so
/// <see cref="BlockOutputs"/> runs only as many blocks as asked; <c>norm</c> and <c>head</c> are here for the
/// state dict only.
/// </summary>
public sealed class VisionTransformer : nn.Module
{
    readonly Parameter cls_token;
    readonly Parameter pos_embed;
    readonly VitPatchEmbed patch_embed;
    readonly ModuleList<VitBlock> blocks;
    readonly LayerNorm norm;
    readonly Linear head;

    public VitConfig Config { get; }

    public VisionTransformer(VitConfig c) : base(nameof(VisionTransformer))
    {
        Config = c;
        cls_token = new Parameter(zeros(1, 1, c.EmbedDim));
        pos_embed = new Parameter(zeros(1, c.GridSize * c.GridSize + 1, c.EmbedDim));
        patch_embed = new VitPatchEmbed(c.InChans, c.EmbedDim, c.PatchSize);
        blocks = new ModuleList<VitBlock>();
        for (int i = 0; i < c.Depth; i++) blocks.Add(new VitBlock(c.EmbedDim, c.NumHeads, c.MlpRatio));
        norm = nn.LayerNorm(c.EmbedDim, eps: 1e-6);
        head = nn.Linear(c.EmbedDim, c.NumClasses);
        RegisterComponents();
    }

    /// <summary>
    /// The outputs of blocks 0..<paramref name="lastBlock"/> (what timm forward hooks on every <c>Block</c> collect),
    /// each [B, 1 + T², E] with the class token first. x: [B, 3, img_size, img_size].
    /// </summary>
    public List<Tensor> BlockOutputs(Tensor x, int lastBlock)
    {
        if (x.shape[2] != Config.ImgSize || x.shape[3] != Config.ImgSize)
            throw new ArgumentException($"ViT: input {x.shape[2]}×{x.shape[3]}, expected {Config.ImgSize}×{Config.ImgSize}");
        var outs = new List<Tensor>();
        using (var scope = NewDisposeScope())
        {
            var t = patch_embed.forward(x);
            var cls = cls_token.expand(t.shape[0], -1, -1);
            t = cat(new[] { cls, t }, 1) + pos_embed;
            for (int i = 0; i <= lastBlock; i++)
            {
                t = blocks[i].forward(t);
                outs.Add(t);
            }
            foreach (var o in outs) o.MoveToOuterDisposeScope();
        }
        return outs;
    }
}
