using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.Stage1;

/// <summary>
/// Constructor arguments of <see cref="SCUNet"/> (official <c>diffbir.model.scunet.SCUNet(in_nc, config, dim, drop_path_rate, input_resolution)</c>).
/// </summary>
/// <param name="InNc">Image channels (<c>in_nc</c>).</param>
/// <param name="Blocks">Swin-Conv blocks per stage: down1, down2, down3, body, up3, up2, up1 (<c>config</c>); 0 removes a stage's blocks, not its 2×2 convs.</param>
/// <param name="Dim">Width of the first stage (<c>dim</c>); must be a multiple of 64 (head_dim 32, half conv / half transformer).</param>
/// <param name="InputResolution">Nominal resolution (<c>input_resolution</c>); a stage whose resolution is ≤ 8 uses plain windows only.</param>
public sealed record SCUNetConfig(int InNc = 3, int[]? Blocks = null, int Dim = 64, int InputResolution = 256)
{
    /// <summary><c>config</c> (official default [2, 2, 2, 2, 2, 2, 2]).</summary>
    public int[] Blocks { get; init; } = Blocks ?? new[] { 2, 2, 2, 2, 2, 2, 2 };

    /// <summary>The released SCUNet (configs/inference/scunet.yaml, weights scunet_color_real_psnr.pth).</summary>
    public static SCUNetConfig Full { get; } = new(InNc: 3, Blocks: new[] { 4, 4, 4, 4, 4, 4, 4 }, Dim: 64);

    /// <summary>Reads the official constructor arguments (JSON object); missing keys take the class defaults.</summary>
    public static SCUNetConfig FromJson(JsonNode node)
    {
        var o = node.AsObject();
        // drop_path_rate only matters in training (DropPath is the identity at eval).
        ConfigJson.RejectUnknown(o, "SCUNet", new[] { "in_nc", "config", "dim", "drop_path_rate", "input_resolution" });
        return new SCUNetConfig(ConfigJson.Int(o, "in_nc", 3), ConfigJson.Ints(o, "config", new[] { 2, 2, 2, 2, 2, 2, 2 }),
            ConfigJson.Int(o, "dim", 64), ConfigJson.Int(o, "input_resolution", 256));
    }
}

/// <summary>
/// SCUNet's window attention (official <c>WMSA</c>), on [B, H, W, C] maps. 'SW' rolls the map by −ws/2 first and masks
/// (with −∞) token pairs that the roll brought together from opposite image borders.
/// </summary>
public sealed class WMSA : nn.Module<Tensor, Tensor>
{
    private readonly Linear embedding_layer;
    // Stored as [n_heads, 2ws−1, 2ws−1] (the official code transposes its table once at construction).
    private readonly Parameter relative_position_params;
    private readonly Linear linear;
    private readonly int headDim, nHeads, windowSize;
    private readonly bool shifted;
    private readonly double scale;

    public WMSA(int inputDim, int outputDim, int headDim, int windowSize, string type) : base(nameof(WMSA))
    {
        this.headDim = headDim;
        nHeads = inputDim / headDim;
        this.windowSize = windowSize;
        shifted = type != "W";
        scale = Math.Pow(headDim, -0.5);
        embedding_layer = nn.Linear(inputDim, 3 * inputDim);
        relative_position_params = new Parameter(zeros(nHeads, 2 * windowSize - 1, 2 * windowSize - 1));
        linear = nn.Linear(inputDim, outputDim);
        RegisterComponents();
    }

    /// <summary>
    /// True where a query/key pair of an 'SW' window must not attend: in the last window row (column), pairs on
    /// different sides of row (column) p − shift. [1, 1, hW·wW, p², p²].
    /// </summary>
    public static Tensor GenerateMask(long hWindows, long wWindows, int p, int shift, Device? device)
    {
        using var scope = NewDisposeScope();
        int s = p - shift;
        var w1 = arange(hWindows, device: device).view(-1, 1, 1, 1, 1, 1);
        var w2 = arange(wWindows, device: device).view(1, -1, 1, 1, 1, 1);
        var low = arange(p, device: device).lt(s); // side of the cut
        var p1 = low.view(1, 1, -1, 1, 1, 1);
        var p2 = low.view(1, 1, 1, -1, 1, 1);
        var p3 = low.view(1, 1, 1, 1, -1, 1);
        var p4 = low.view(1, 1, 1, 1, 1, -1);
        var rows = w1.eq(hWindows - 1).logical_and(p1.ne(p3));
        var cols = w2.eq(wWindows - 1).logical_and(p2.ne(p4));
        var mask = rows.logical_or(cols).expand(hWindows, wWindows, p, p, p, p);
        return scope.MoveToOuter(mask.reshape(1, 1, hWindows * wWindows, p * p, p * p));
    }

    /// <summary>Bias B[h, i, j] for tokens i, j of a window, read from the (2ws−1)² table at their offset.</summary>
    private Tensor RelativeEmbedding()
    {
        using var scope = NewDisposeScope();
        var idx = arange(windowSize * windowSize, device: relative_position_params.device);
        var row = idx.div(windowSize, rounding_mode: RoundingMode.floor);
        var col = idx.remainder(windowSize);
        var dr = row.unsqueeze(1) - row.unsqueeze(0) + (windowSize - 1);
        var dc = col.unsqueeze(1) - col.unsqueeze(0) + (windowSize - 1);
        var flat = relative_position_params.view(nHeads, -1);
        var b = flat.index_select(1, (dr * (2 * windowSize - 1) + dc).view(-1)).view(nHeads, windowSize * windowSize, windowSize * windowSize);
        return scope.MoveToOuter(b);
    }

    /// <summary>x: [B, H, W, C] → [B, H, W, output_dim].</summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        int p = windowSize, half = windowSize / 2;
        if (shifted) x = x.roll(new long[] { -half, -half }, new long[] { 1, 2 });
        long b = x.shape[0], hW = x.shape[1] / p, wW = x.shape[2] / p, c = x.shape[3];
        // b (w1 p1) (w2 p2) c -> b (w1 w2) (p1 p2) c
        x = x.view(b, hW, p, wW, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hW * wW, p * p, c);
        var qkv = embedding_layer.forward(x);
        // b nw np (threeh c) -> threeh b nw np c, then q, k, v = the three head groups
        qkv = qkv.view(b, hW * wW, p * p, 3 * nHeads, headDim).permute(3, 0, 1, 2, 4);
        var chunks = qkv.chunk(3, 0);
        var q = chunks[0];
        var k = chunks[1];
        var v = chunks[2];
        var sim = einsum("hbwpc,hbwqc->hbwpq", q, k) * scale;
        sim = sim + RelativeEmbedding().view(nHeads, 1, 1, p * p, p * p);
        if (shifted) sim = sim.masked_fill(GenerateMask(hW, wW, p, half, x.device), double.NegativeInfinity);
        var probs = sim.softmax(-1);
        var o = einsum("hbwij,hbwjc->hbwic", probs, v);
        // h b w p c -> b w p (h c)
        o = o.permute(1, 2, 3, 0, 4).reshape(b, hW * wW, p * p, nHeads * headDim);
        o = linear.forward(o);
        // b (w1 w2) (p1 p2) c -> b (w1 p1) (w2 p2) c
        long oc = o.shape[3];
        o = o.view(b, hW, wW, p, p, oc).permute(0, 1, 3, 2, 4, 5).reshape(b, hW * p, wW * p, oc);
        if (shifted) o = o.roll(new long[] { half, half }, new long[] { 1, 2 });
        return scope.MoveToOuter(o);
    }
}

/// <summary>Swin block of SCUNet (official <c>Block</c>): x + WMSA(LN(x)), then x + MLP(LN(x)); on [B, H, W, C].</summary>
public sealed class SCUNetSwinBlock : nn.Module<Tensor, Tensor>
{
    private readonly LayerNorm ln1, ln2;
    private readonly WMSA msa;
    private readonly Sequential mlp;

    public SCUNetSwinBlock(int inputDim, int outputDim, int headDim, int windowSize, string type) : base("Block")
    {
        ln1 = nn.LayerNorm(inputDim);
        msa = new WMSA(inputDim, inputDim, headDim, windowSize, type);
        ln2 = nn.LayerNorm(inputDim);
        mlp = nn.Sequential(("0", nn.Linear(inputDim, 4 * inputDim)), ("1", nn.GELU()), ("2", nn.Linear(4 * inputDim, outputDim)));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        x = x + msa.forward(ln1.forward(x));
        x = x + mlp.forward(ln2.forward(x));
        return scope.MoveToOuter(x);
    }
}

/// <summary>
/// Swin-Conv block: a 1×1 conv splits the channels into a residual-conv half and a Swin half, their outputs are
/// concatenated, mixed by another 1×1 conv, and added to the input.
/// </summary>
public sealed class ConvTransBlock : nn.Module<Tensor, Tensor>
{
    private readonly SCUNetSwinBlock trans_block;
    private readonly Conv2d conv1_1, conv1_2;
    private readonly Sequential conv_block;
    private readonly int convDim, transDim;

    public ConvTransBlock(int convDim, int transDim, int headDim, int windowSize, string type, int inputResolution)
        : base(nameof(ConvTransBlock))
    {
        this.convDim = convDim;
        this.transDim = transDim;
        // Official: a stage no larger than one window has nothing to shift.
        if (inputResolution <= windowSize) type = "W";
        trans_block = new SCUNetSwinBlock(transDim, transDim, headDim, windowSize, type);
        conv1_1 = nn.Conv2d(convDim + transDim, convDim + transDim, 1, 1, 0);
        conv1_2 = nn.Conv2d(convDim + transDim, convDim + transDim, 1, 1, 0);
        conv_block = nn.Sequential(
            ("0", nn.Conv2d(convDim, convDim, 3, 1, 1, bias: false)), ("1", nn.ReLU()),
            ("2", nn.Conv2d(convDim, convDim, 3, 1, 1, bias: false)));
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        var parts = conv1_1.forward(x).split(new long[] { convDim, transDim }, 1);
        var convX = conv_block.forward(parts[0]) + parts[0];
        var transX = trans_block.forward(parts[1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2);
        var res = conv1_2.forward(cat(new[] { convX, transX }, 1));
        return scope.MoveToOuter(x + res);
    }
}

/// <summary>
/// SCUNet, DiffBIR v2's stage-1 cleaner for denoising / blind image denoising (official <c>diffbir.model.scunet.SCUNet</c>):
/// a 4-level U-Net of Swin-Conv blocks, 2×2 strided convs down and transposed convs up. The input is
/// replication-padded to a multiple of 64 and the output cropped back to the input size.
/// </summary>
public sealed class SCUNet : nn.Module<Tensor, Tensor>
{
    private const int HeadDim = 32, WindowSize = 8;
    private readonly Sequential m_head, m_down1, m_down2, m_down3, m_body, m_up3, m_up2, m_up1, m_tail;

    /// <summary>The configuration this network was built from.</summary>
    public SCUNetConfig Config { get; }

    /// <summary>Builds the network (parameters uninitialised: load a state dict).</summary>
    public SCUNet(SCUNetConfig config) : base(nameof(SCUNet))
    {
        Config = config;
        var n = config.Blocks;
        if (n.Length != 7) throw new ArgumentException($"SCUNet: config needs 7 block counts, got {n.Length}");
        if (config.Dim % 64 != 0) throw new ArgumentException($"SCUNet: dim {config.Dim} must be a multiple of 64 (head_dim 32 on half the channels)");
        int dim = config.Dim, r = config.InputResolution;

        // 'W' and 'SW' alternate inside each stage.
        IEnumerable<nn.Module<Tensor, Tensor>> Stage(int count, int d, int res) =>
            Enumerable.Range(0, count).Select(i => (nn.Module<Tensor, Tensor>)new ConvTransBlock(d, d, HeadDim, WindowSize, i % 2 == 0 ? "W" : "SW", res));
        static Sequential Seq(IEnumerable<nn.Module<Tensor, Tensor>> ms) =>
            nn.Sequential(ms.Select((m, i) => (i.ToString(), m)).ToArray());

        m_head = Seq(new[] { nn.Conv2d(config.InNc, dim, 3, 1, 1, bias: false) });
        m_down1 = Seq(Stage(n[0], dim / 2, r).Append(nn.Conv2d(dim, 2 * dim, 2, 2, 0, bias: false)));
        m_down2 = Seq(Stage(n[1], dim, r / 2).Append(nn.Conv2d(2 * dim, 4 * dim, 2, 2, 0, bias: false)));
        m_down3 = Seq(Stage(n[2], 2 * dim, r / 4).Append(nn.Conv2d(4 * dim, 8 * dim, 2, 2, 0, bias: false)));
        m_body = Seq(Stage(n[3], 4 * dim, r / 8));
        m_up3 = Seq(Stage(n[4], 2 * dim, r / 4).Prepend(nn.ConvTranspose2d(8 * dim, 4 * dim, 2, 2, 0, bias: false)));
        m_up2 = Seq(Stage(n[5], dim, r / 2).Prepend(nn.ConvTranspose2d(4 * dim, 2 * dim, 2, 2, 0, bias: false)));
        m_up1 = Seq(Stage(n[6], dim / 2, r).Prepend(nn.ConvTranspose2d(2 * dim, dim, 2, 2, 0, bias: false)));
        m_tail = Seq(new[] { nn.Conv2d(dim, config.InNc, 3, 1, 1, bias: false) });
        RegisterComponents();
    }

    /// <summary>x: [B, in_nc, H, W] → [B, in_nc, H, W] (any H, W: padded to a multiple of 64 inside).</summary>
    public override Tensor forward(Tensor x0)
    {
        using var scope = NewDisposeScope();
        long h = x0.shape[2], w = x0.shape[3];
        long padBottom = (h + 63) / 64 * 64 - h, padRight = (w + 63) / 64 * 64 - w;
        if (padBottom > 0 || padRight > 0) x0 = nn.functional.pad(x0, new[] { 0, padRight, 0, padBottom }, PaddingModes.Replicate);
        var x1 = m_head.forward(x0);
        var x2 = m_down1.forward(x1);
        var x3 = m_down2.forward(x2);
        var x4 = m_down3.forward(x3);
        var x = m_body.forward(x4);
        x = m_up3.forward(x + x4);
        x = m_up2.forward(x + x3);
        x = m_up1.forward(x + x2);
        x = m_tail.forward(x + x1);
        return scope.MoveToOuter(x.slice(2, 0, h, 1).slice(3, 0, w, 1));
    }
}
