using System.Text.Json.Nodes;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models.Stage1;

/// <summary>
/// Constructor arguments of <see cref="SwinIR"/> (official <c>diffbir.model.swinir.SwinIR</c>; names in brackets).
/// </summary>
/// <param name="ImgSize">Token grid side the masks are precomputed for (<c>img_size</c>; 64 tokens = 512 px with the ×8 unshuffle).</param>
/// <param name="PatchSize">Patch size (<c>patch_size</c>); the token grid is img_size / patch_size.</param>
/// <param name="InChans">Image channels (<c>in_chans</c>).</param>
/// <param name="EmbedDim">Transformer width (<c>embed_dim</c>).</param>
/// <param name="Depths">Swin blocks per RSTB (<c>depths</c>).</param>
/// <param name="NumHeads">Attention heads per RSTB (<c>num_heads</c>).</param>
/// <param name="WindowSize">Attention window side (<c>window_size</c>).</param>
/// <param name="MlpRatio">MLP hidden width / embed_dim (<c>mlp_ratio</c>).</param>
/// <param name="Sf">Upscale factor (<c>sf</c>); with unshuffle it is also the PixelUnshuffle factor.</param>
/// <param name="ImgRange">Image range (<c>img_range</c>), 1 or 255.</param>
/// <param name="Upsampler">Reconstruction head (<c>upsampler</c>); this port implements "nearest+conv" (DiffBIR's).</param>
/// <param name="ResiConnection">Conv after each RSTB (<c>resi_connection</c>): "1conv" or "3conv".</param>
/// <param name="Unshuffle">PixelUnshuffle the input before the first conv (<c>unshuffle</c>; DiffBIR's modification).</param>
/// <param name="UnshuffleScale">Sets the first conv's input channels, in_chans·scale² (<c>unshuffle_scale</c>).</param>
/// <param name="DropPathRate">Stochastic depth of the last Swin block (<c>drop_path_rate</c>, official default 0.1); block i of
/// n drops its residual branches with probability linspace(0, rate, n)[i] in training mode only.</param>
public sealed record SwinIRConfig(
    int ImgSize = 64, int PatchSize = 1, int InChans = 3, int EmbedDim = 96,
    int[]? Depths = null, int[]? NumHeads = null, int WindowSize = 7, double MlpRatio = 4.0,
    int Sf = 4, double ImgRange = 1.0, string Upsampler = "", string ResiConnection = "1conv",
    bool Unshuffle = false, int? UnshuffleScale = null, double DropPathRate = 0.1)
{
    /// <summary><c>depths</c> (official default [6, 6, 6, 6]).</summary>
    public int[] Depths { get; init; } = Depths ?? new[] { 6, 6, 6, 6 };
    /// <summary><c>num_heads</c> (official default [6, 6, 6, 6]).</summary>
    public int[] NumHeads { get; init; } = NumHeads ?? new[] { 6, 6, 6, 6 };

    /// <summary>The released DiffBIR SwinIR (configs/inference/swinir.yaml; general_swinir_v1.ckpt, face_swinir_v1.ckpt, realesrgan_s4_swinir_100k.pth).</summary>
    public static SwinIRConfig Full { get; } = new(
        ImgSize: 64, PatchSize: 1, InChans: 3, EmbedDim: 180, Depths: new[] { 6, 6, 6, 6, 6, 6, 6, 6 },
        NumHeads: new[] { 6, 6, 6, 6, 6, 6, 6, 6 }, WindowSize: 8, MlpRatio: 2, Sf: 8, ImgRange: 1.0,
        Upsampler: "nearest+conv", ResiConnection: "1conv", Unshuffle: true, UnshuffleScale: 8);

    /// <summary>Reads the official constructor arguments (JSON object); missing keys take the class defaults.</summary>
    public static SwinIRConfig FromJson(JsonNode node)
    {
        var o = node.AsObject();
        ConfigJson.RejectUnknown(o, "SwinIR", new[]
        {
            "img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads", "window_size", "mlp_ratio", "sf",
            "img_range", "upsampler", "resi_connection", "unshuffle", "unshuffle_scale", "drop_path_rate",
            // training-only arguments of the Lightning-era class: no effect on the network
            "hq_key", "lq_key", "learning_rate", "weight_decay",
        });
        return new SwinIRConfig(
            ConfigJson.Int(o, "img_size", 64), ConfigJson.Int(o, "patch_size", 1), ConfigJson.Int(o, "in_chans", 3),
            ConfigJson.Int(o, "embed_dim", 96), ConfigJson.Ints(o, "depths", new[] { 6, 6, 6, 6 }),
            ConfigJson.Ints(o, "num_heads", new[] { 6, 6, 6, 6 }), ConfigJson.Int(o, "window_size", 7),
            ConfigJson.Double(o, "mlp_ratio", 4.0), ConfigJson.Int(o, "sf", 4), ConfigJson.Double(o, "img_range", 1.0),
            ConfigJson.String(o, "upsampler", ""), ConfigJson.String(o, "resi_connection", "1conv"),
            ConfigJson.Bool(o, "unshuffle", false), o["unshuffle_scale"] is { } s ? (int)s : null,
            ConfigJson.Double(o, "drop_path_rate", 0.1));
    }
}

/// <summary>Two-layer GELU MLP of a Swin block (fc1 → GELU → fc2).</summary>
public sealed class SwinMlp : nn.Module<Tensor, Tensor>
{
    private readonly Linear fc1, fc2;

    public SwinMlp(int inFeatures, int hiddenFeatures) : base("Mlp")
    {
        fc1 = nn.Linear(inFeatures, hiddenFeatures);
        fc2 = nn.Linear(hiddenFeatures, inFeatures);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        using var h = fc1.forward(x);
        using var a = nn.functional.gelu(h);
        return fc2.forward(a);
    }
}

/// <summary>
/// Window multi-head self-attention with a learned relative-position bias B: softmax(Q·Kᵀ/√d + B + mask)·V, computed
/// independently inside each ws×ws window.
/// </summary>
public sealed class WindowAttention : nn.Module<Tensor, Tensor?, Tensor>
{
    private readonly Parameter relative_position_bias_table;
    // Persistent buffer: the released checkpoints carry it, so it must be in the state dict.
    private readonly Tensor relative_position_index;
    private readonly Linear qkv, proj;
    private readonly int windowSize, numHeads;
    private readonly double scale;

    public WindowAttention(int dim, int windowSize, int numHeads) : base(nameof(WindowAttention))
    {
        this.windowSize = windowSize;
        this.numHeads = numHeads;
        scale = Math.Pow(dim / numHeads, -0.5);
        relative_position_bias_table = new Parameter(zeros((2 * windowSize - 1) * (2 * windowSize - 1), numHeads));
        relative_position_index = RelativePositionIndex(windowSize);
        qkv = nn.Linear(dim, dim * 3);
        proj = nn.Linear(dim, dim);
        RegisterComponents();
    }

    /// <summary>
    /// For tokens i, j of a window (row-major), the index of their offset (Δrow, Δcol) in the (2ws−1)² bias table:
    /// (Δrow + ws − 1)·(2ws − 1) + (Δcol + ws − 1).
    /// </summary>
    public static Tensor RelativePositionIndex(int ws)
    {
        using var scope = NewDisposeScope();
        var idx = arange(ws * ws, dtype: ScalarType.Int64);
        var row = idx.div(ws, rounding_mode: RoundingMode.floor);
        var col = idx.remainder(ws);
        var drow = row.unsqueeze(1) - row.unsqueeze(0) + (ws - 1);
        var dcol = col.unsqueeze(1) - col.unsqueeze(0) + (ws - 1);
        return scope.MoveToOuter(drow * (2 * ws - 1) + dcol);
    }

    /// <summary>x: [nW·B, N, C] window tokens; mask: [nW, N, N] of 0 / −100 or null.</summary>
    public override Tensor forward(Tensor x, Tensor? mask)
    {
        using var scope = NewDisposeScope();
        long b_ = x.shape[0], n = x.shape[1], c = x.shape[2];
        var qkvT = qkv.forward(x).reshape(b_, n, 3, numHeads, c / numHeads).permute(2, 0, 3, 1, 4);
        var q = qkvT[0] * scale;
        var k = qkvT[1];
        var v = qkvT[2];
        var attn = q.matmul(k.transpose(-2, -1));
        var bias = relative_position_bias_table[relative_position_index.view(-1)]
            .view(windowSize * windowSize, windowSize * windowSize, -1).permute(2, 0, 1).contiguous();
        attn = attn + bias.unsqueeze(0);
        if (mask is not null)
        {
            var nW = mask.shape[0];
            attn = attn.view(b_ / nW, nW, numHeads, n, n) + mask.unsqueeze(1).unsqueeze(0);
            attn = attn.view(-1, numHeads, n, n);
        }
        attn = attn.softmax(-1);
        var y = attn.matmul(v).transpose(1, 2).reshape(b_, n, c);
        return scope.MoveToOuter(proj.forward(y));
    }
}

/// <summary>
/// Swin Transformer block: LayerNorm → (shifted) window attention → residual, LayerNorm → MLP → residual.
/// Odd blocks shift the grid by ws/2 so that information crosses window borders.
/// </summary>
public sealed class SwinTransformerBlock : nn.Module
{
    private readonly LayerNorm norm1, norm2;
    private readonly WindowAttention attn;
    private readonly SwinMlp mlp;
    // Persistent buffer (official register_buffer): the shifted-window mask for the configured token grid, or null.
    private readonly Tensor? attn_mask;
    private readonly (long H, long W) inputResolution;
    private readonly int windowSize, shiftSize;
    // Official: DropPath(drop_path) if drop_path > 0 else nn.Identity(); applied to both residual branches.
    private readonly DropPath? drop_path;

    public SwinTransformerBlock(int dim, (long H, long W) inputResolution, int numHeads, int windowSize, int shiftSize, double mlpRatio,
        double dropPath = 0)
        : base(nameof(SwinTransformerBlock))
    {
        this.inputResolution = inputResolution;
        // As the official code: a grid no larger than one window is one unshifted window.
        if (Math.Min(inputResolution.H, inputResolution.W) <= windowSize)
        {
            shiftSize = 0;
            windowSize = (int)Math.Min(inputResolution.H, inputResolution.W);
        }
        if (shiftSize < 0 || shiftSize >= windowSize) throw new ArgumentException("shift_size must be in [0, window_size)");
        this.windowSize = windowSize;
        this.shiftSize = shiftSize;
        norm1 = nn.LayerNorm(dim);
        attn = new WindowAttention(dim, windowSize, numHeads);
        norm2 = nn.LayerNorm(dim);
        mlp = new SwinMlp(dim, (int)(dim * mlpRatio));
        attn_mask = shiftSize > 0 ? CalculateMask(inputResolution.H, inputResolution.W, windowSize, shiftSize, null) : null;
        if (dropPath > 0) drop_path = new DropPath(dropPath);
        RegisterComponents();
    }

    /// <summary>
    /// The SW-MSA mask for an H×W token grid: after the cyclic shift, tokens of one window that came from different
    /// regions (3×3 regions cut at −ws and −shift) get −100 so they do not attend to each other. [nW, ws², ws²].
    /// </summary>
    public static Tensor CalculateMask(long h, long w, int windowSize, int shiftSize, Device? device)
    {
        using var scope = NewDisposeScope();
        // Region of each row / column: 0 before −ws, 1 in [−ws, −shift), 2 from −shift on (the official slices).
        Tensor Region(long size)
        {
            var i = arange(size, dtype: ScalarType.Int64, device: device);
            return (i >= size - windowSize).to_type(ScalarType.Int64) + (i >= size - shiftSize).to_type(ScalarType.Int64);
        }
        var cnt = (Region(h).unsqueeze(1) * 3 + Region(w).unsqueeze(0)).to_type(ScalarType.Float32);
        var windows = WindowPartition(cnt.view(1, h, w, 1), windowSize).view(-1, windowSize * windowSize);
        var diff = windows.unsqueeze(1) - windows.unsqueeze(2);
        var mask = zeros_like(diff).masked_fill(diff.ne(0), -100.0);
        return scope.MoveToOuter(mask);
    }

    /// <summary>(B, H, W, C) → (nW·B, ws, ws, C).</summary>
    public static Tensor WindowPartition(Tensor x, int ws)
    {
        long b = x.shape[0], h = x.shape[1], w = x.shape[2], c = x.shape[3];
        if (h % ws != 0 || w % ws != 0)
            throw new ArgumentException($"SwinIR: token grid {h}×{w} is not a multiple of the window size {ws} "
                                        + "(the official code fails here too; with the ×8 unshuffle the padded image side must be a multiple of 8·ws)");
        using var v = x.view(b, h / ws, ws, w / ws, ws, c);
        using var p = v.permute(0, 1, 3, 2, 4, 5);
        using var pc = p.contiguous();
        return pc.view(-1, ws, ws, c);
    }

    /// <summary>(nW·B, ws, ws, C) → (B, H, W, C).</summary>
    public static Tensor WindowReverse(Tensor windows, int ws, long h, long w)
    {
        long b = windows.shape[0] / (h * w / ws / ws);
        using var v = windows.view(b, h / ws, w / ws, ws, ws, -1);
        using var p = v.permute(0, 1, 3, 2, 4, 5);
        using var pc = p.contiguous();
        return pc.view(b, h, w, -1);
    }

    private Tensor DropPathOf(Tensor x) => drop_path is null ? x : drop_path.forward(x);

    /// <summary>x: [B, H·W, C] tokens of an H×W grid.</summary>
    public Tensor forward(Tensor x, long h, long w)
    {
        using var scope = NewDisposeScope();
        long b = x.shape[0], c = x.shape[2];
        var shortcut = x;
        var t = norm1.forward(x).view(b, h, w, c);
        if (shiftSize > 0) t = t.roll(new long[] { -shiftSize, -shiftSize }, new long[] { 1, 2 });
        var xw = WindowPartition(t, windowSize).view(-1, windowSize * windowSize, c);
        // The stored mask fits only the configured grid; any other grid gets its own (official behaviour). For an
        // unshifted block the official recomputed mask is all zeros, so adding nothing is the same.
        Tensor? mask = (h, w) == inputResolution ? attn_mask
            : shiftSize > 0 ? CalculateMask(h, w, windowSize, shiftSize, x.device) : null;
        var aw = attn.forward(xw, mask).view(-1, windowSize, windowSize, c);
        t = WindowReverse(aw, windowSize, h, w);
        if (shiftSize > 0) t = t.roll(new long[] { shiftSize, shiftSize }, new long[] { 1, 2 });
        var y = shortcut + DropPathOf(t.view(b, h * w, c));
        y = y + DropPathOf(mlp.forward(norm2.forward(y)));
        return scope.MoveToOuter(y);
    }
}

/// <summary>The Swin blocks of one RSTB (official <c>BasicLayer</c>, without downsampling).</summary>
public sealed class BasicLayer : nn.Module
{
    private readonly ModuleList<SwinTransformerBlock> blocks;

    public BasicLayer(int dim, (long H, long W) inputResolution, int depth, int numHeads, int windowSize, double mlpRatio,
        double[]? dropPath = null)
        : base(nameof(BasicLayer))
    {
        blocks = new ModuleList<SwinTransformerBlock>();
        for (int i = 0; i < depth; i++)
            blocks.Add(new SwinTransformerBlock(dim, inputResolution, numHeads, windowSize, i % 2 == 0 ? 0 : windowSize / 2, mlpRatio,
                dropPath?[i] ?? 0));
        RegisterComponents();
    }

    public Tensor forward(Tensor x, long h, long w)
    {
        using var scope = NewDisposeScope();
        foreach (var blk in blocks) x = blk.forward(x, h, w);
        return scope.MoveToOuter(x);
    }
}

/// <summary>Residual Swin Transformer Block: Swin blocks, back to an image, a conv, plus the RSTB's input.</summary>
public sealed class RSTB : nn.Module
{
    private readonly BasicLayer residual_group;
    private readonly nn.Module<Tensor, Tensor> conv;

    public RSTB(int dim, (long H, long W) inputResolution, int depth, int numHeads, int windowSize, double mlpRatio, string resiConnection,
        double[]? dropPath = null)
        : base(nameof(RSTB))
    {
        residual_group = new BasicLayer(dim, inputResolution, depth, numHeads, windowSize, mlpRatio, dropPath);
        conv = resiConnection switch
        {
            "1conv" => nn.Conv2d(dim, dim, 3, 1, 1),
            "3conv" => nn.Sequential(
                ("0", nn.Conv2d(dim, dim / 4, 3, 1, 1)), ("1", nn.LeakyReLU(0.2)),
                ("2", nn.Conv2d(dim / 4, dim / 4, 1, 1, 0)), ("3", nn.LeakyReLU(0.2)),
                ("4", nn.Conv2d(dim / 4, dim, 3, 1, 1))),
            _ => throw new ArgumentException($"SwinIR: resi_connection '{resiConnection}' is not '1conv' or '3conv'"),
        };
        RegisterComponents();
    }

    /// <summary>x: [B, H·W, C] tokens.</summary>
    public Tensor forward(Tensor x, long h, long w)
    {
        using var scope = NewDisposeScope();
        var r = residual_group.forward(x, h, w);
        var img = SwinIR.TokensToImage(r, h, w);
        var y = SwinIR.ImageToTokens(conv.forward(img)) + x;
        return scope.MoveToOuter(y);
    }
}

/// <summary>
/// SwinIR as DiffBIR uses it for stage 1 (official <c>diffbir.model.swinir.SwinIR</c>): the image is reflect-padded
/// to a multiple of the window, mean-shifted, PixelUnshuffled ×8 (so the transformer runs at 1/8 resolution), passed
/// through the RSTB stack, then brought back by three nearest ×2 + conv + LeakyReLU steps. Input and output in [0, 1].
/// </summary>
public sealed class SwinIR : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> conv_first;
    private readonly PatchEmbed patch_embed;
    private readonly ModuleList<RSTB> layers;
    private readonly LayerNorm norm;
    private readonly nn.Module<Tensor, Tensor> conv_after_body;
    private readonly Sequential conv_before_upsample;
    private readonly Conv2d conv_up1;
    private readonly Conv2d? conv_up2, conv_up3;
    private readonly Conv2d conv_hr, conv_last;
    // Not a buffer in the official code (a plain attribute), so it stays out of the state dict.
    private readonly float[] mean;

    /// <summary>The configuration this network was built from.</summary>
    public SwinIRConfig Config { get; }

    /// <summary>Builds the network (parameters uninitialised: load a state dict).</summary>
    public SwinIR(SwinIRConfig config) : base(nameof(SwinIR))
    {
        Config = config;
        if (config.Upsampler != "nearest+conv")
            throw new NotSupportedException($"SwinIR: upsampler '{config.Upsampler}' is not implemented (DiffBIR uses 'nearest+conv')");
        if (config.Depths.Length != config.NumHeads.Length)
            throw new ArgumentException("SwinIR: depths and num_heads differ in length");
        int numInCh = config.Unshuffle ? config.InChans * (config.UnshuffleScale
            ?? throw new ArgumentException("SwinIR: unshuffle needs unshuffle_scale")) * config.UnshuffleScale.Value : config.InChans;
        const int numFeat = 64;
        mean = config.InChans == 3 ? new[] { 0.4488f, 0.4371f, 0.4040f } : new float[config.InChans];

        // The official code unshuffles by sf (not unshuffle_scale); the two are equal in every DiffBIR config.
        conv_first = config.Unshuffle
            ? nn.Sequential(("0", nn.PixelUnshuffle(config.Sf)), ("1", nn.Conv2d(numInCh, config.EmbedDim, 3, 1, 1)))
            : nn.Conv2d(numInCh, config.EmbedDim, 3, 1, 1);
        patch_embed = new PatchEmbed(config.EmbedDim);
        var res = ((long)(config.ImgSize / config.PatchSize), (long)(config.ImgSize / config.PatchSize));
        layers = new ModuleList<RSTB>();
        var dpr = DropPathRates(config.DropPathRate, config.Depths.Sum());
        for (int i = 0, first = 0; i < config.Depths.Length; first += config.Depths[i], i++)
            layers.Add(new RSTB(config.EmbedDim, res, config.Depths[i], config.NumHeads[i], config.WindowSize, config.MlpRatio, config.ResiConnection,
                dpr[first..(first + config.Depths[i])]));
        norm = nn.LayerNorm(config.EmbedDim);
        conv_after_body = config.ResiConnection switch
        {
            "1conv" => nn.Conv2d(config.EmbedDim, config.EmbedDim, 3, 1, 1),
            "3conv" => nn.Sequential(
                ("0", nn.Conv2d(config.EmbedDim, config.EmbedDim / 4, 3, 1, 1)), ("1", nn.LeakyReLU(0.2)),
                ("2", nn.Conv2d(config.EmbedDim / 4, config.EmbedDim / 4, 1, 1, 0)), ("3", nn.LeakyReLU(0.2)),
                ("4", nn.Conv2d(config.EmbedDim / 4, config.EmbedDim, 3, 1, 1))),
            _ => throw new ArgumentException($"SwinIR: resi_connection '{config.ResiConnection}' is not '1conv' or '3conv'"),
        };
        // nn.LeakyReLU(inplace=True) here has PyTorch's default slope 0.01; self.lrelu below uses 0.2.
        conv_before_upsample = nn.Sequential(("0", nn.Conv2d(config.EmbedDim, numFeat, 3, 1, 1)), ("1", nn.LeakyReLU(0.01)));
        conv_up1 = nn.Conv2d(numFeat, numFeat, 3, 1, 1);
        if (config.Sf == 4 || config.Sf == 8) conv_up2 = nn.Conv2d(numFeat, numFeat, 3, 1, 1);
        if (config.Sf == 8) conv_up3 = nn.Conv2d(numFeat, numFeat, 3, 1, 1);
        conv_hr = nn.Conv2d(numFeat, numFeat, 3, 1, 1);
        conv_last = nn.Conv2d(numFeat, config.InChans, 3, 1, 1);
        RegisterComponents();
    }

    /// <summary>
    /// The official stochastic-depth rule <c>[x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]</c>:
    /// float32 values, read back as doubles (so 0.1 becomes 0.10000000149011612).
    /// </summary>
    public static double[] DropPathRates(double rate, int blocks)
    {
        using var l = linspace(0, rate, blocks, dtype: ScalarType.Float32, device: CPU);  // also when the default device is meta
        return l.data<float>().Select(x => (double)x).ToArray();
    }

    /// <summary>Sets where the DropPath keep masks come from in training mode (null: torch's global generator).</summary>
    public void SetDropPathDraws(DiffBIR.Lab.Training.ITrainingDraws? draws) => DropPath.SetDraws(this, draws);

    /// <summary>Image → tokens, then LayerNorm (official <c>PatchEmbed</c> with patch_norm=True; keys <c>patch_embed.norm.*</c>).</summary>
    private sealed class PatchEmbed : nn.Module<Tensor, Tensor>
    {
        private readonly LayerNorm norm;

        public PatchEmbed(int embedDim) : base(nameof(PatchEmbed))
        {
            norm = nn.LayerNorm(embedDim);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x)
        {
            using var t = ImageToTokens(x);
            return norm.forward(t);
        }
    }

    /// <summary>[B, C, H, W] → [B, H·W, C].</summary>
    internal static Tensor ImageToTokens(Tensor x)
    {
        using var f = x.flatten(2);
        return f.transpose(1, 2);
    }

    /// <summary>[B, H·W, C] → [B, C, H, W].</summary>
    internal static Tensor TokensToImage(Tensor x, long h, long w)
    {
        using var t = x.transpose(1, 2);
        return t.view(x.shape[0], x.shape[2], h, w);
    }

    /// <summary>
    /// x: [B, C, H, W] in [0, 1] → [B, C, H', W'] where H', W' are H, W reflect-padded up to a multiple of
    /// window_size, then cropped to sf·H (a no-op with the ×8 unshuffle: the output keeps the PADDED size, as the
    /// official code). With unshuffle the padded side must be a multiple of 8·window_size, or window partition fails.
    /// </summary>
    public override Tensor forward(Tensor x)
    {
        using var scope = NewDisposeScope();
        long h = x.shape[2], w = x.shape[3];
        int ws = Config.WindowSize;
        long padH = (ws - h % ws) % ws, padW = (ws - w % ws) % ws;
        if (padH > 0 || padW > 0) x = nn.functional.pad(x, new[] { 0, padW, 0, padH }, PaddingModes.Reflect);
        var meanT = tensor(mean, dtype: x.dtype, device: x.device).view(1, -1, 1, 1);
        x = (x - meanT) * Config.ImgRange;

        x = conv_first.forward(x);
        x = conv_after_body.forward(ForwardFeatures(x)) + x;
        x = conv_before_upsample.forward(x);
        x = LRelu(conv_up1.forward(RRDBNet.Nearest2x(x)));
        if (conv_up2 is not null) x = LRelu(conv_up2.forward(RRDBNet.Nearest2x(x)));
        if (conv_up3 is not null) x = LRelu(conv_up3.forward(RRDBNet.Nearest2x(x)));
        x = conv_last.forward(LRelu(conv_hr.forward(x)));

        x = x / Config.ImgRange + meanT;
        var y = x.slice(2, 0, Math.Min(h * Config.Sf, x.shape[2]), 1).slice(3, 0, Math.Min(w * Config.Sf, x.shape[3]), 1);
        return scope.MoveToOuter(y);
    }

    private Tensor ForwardFeatures(Tensor x)
    {
        long h = x.shape[2], w = x.shape[3];
        var t = patch_embed.forward(x);
        foreach (var layer in layers) t = layer.forward(t, h, w);
        t = norm.forward(t);
        return TokensToImage(t, h, w);
    }

    private static Tensor LRelu(Tensor x) => nn.functional.leaky_relu(x, 0.2);
}
