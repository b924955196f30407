using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DiffBIR.Lab.Models.Vae;

/// <summary>
/// Tiled VAE encoder / decoder as the official <c>diffbir/utils/tilevae</c> (<c>VAEHook</c>, by Li Yi, with
/// fast_encoder = fast_decoder = False as ControlLDM passes them): the input is cut into tiles padded by 32 pixels
/// (encoder) or 11 latent pixels (decoder); each network is unrolled into a task queue, and every tile runs its queue
/// up to the next GroupNorm. There all tiles stop, their per-group variance and mean are averaged with weights
/// proportional to the tile's pixel count, and that shared statistic normalises every tile — so the output is
/// seamless although convolutions and the middle self-attention only see one tile. Each tile's valid region (the
/// padding cropped off) is written into the result.
/// <para>color_fix only acts in fast mode (it stops the group-norm estimation at the first downsample), so with fast
/// mode off, as here, it has no effect. The middle attention uses the vanilla bmm path (the fixtures' ATTN_MODE).</para>
/// </summary>
public sealed class TiledVae
{
    enum Kind { ConvIn, StoreRes, PreNorm, ApplyNorm, Silu, Conv, AddRes, Attn, Resample }

    sealed class TaskItem
    {
        public Kind Kind;
        public Func<Tensor, Tensor>? Fn;
        public GroupNorm? Norm;
        public Tensor? Residual;
        public TaskItem Clone() => new() { Kind = Kind, Fn = Fn, Norm = Norm };
    }

    readonly nn.Module _net;
    readonly Dictionary<string, nn.Module> _mods;
    readonly string _prefix;
    readonly bool _isDecoder;
    readonly int _numResolutions, _numResBlocks;
    /// <summary>GroupNorm groups of the VAE (32 except for the tiny one).</summary>
    readonly int _groups;
    readonly bool _normOut;

    /// <summary>Tile side: pixels for the encoder, latent pixels for the decoder (official <c>tile_size</c>).</summary>
    public int TileSize { get; }
    /// <summary>Context added around every tile: 32 pixels (encoder) or 11 latent pixels (decoder).</summary>
    public int Pad => _isDecoder ? 11 : 32;

    /// <param name="vae">The autoencoder whose <c>encoder</c> or <c>decoder</c> is tiled.</param>
    public TiledVae(AutoencoderKL vae, bool isDecoder, int tileSize)
    {
        _isDecoder = isDecoder;
        TileSize = tileSize;
        _prefix = isDecoder ? "decoder." : "encoder.";
        _mods = vae.named_modules().ToDictionary(m => m.name, m => m.module);
        _net = _mods[_prefix.TrimEnd('.')];
        _numResolutions = vae.Config.DdConfig.ChMult.Length;
        _numResBlocks = vae.Config.DdConfig.NumResBlocks;
        _groups = vae.Config.DdConfig.NormGroups;
        _normOut = vae.Config.DdConfig.NormOut;
        if (vae.Config.DdConfig.AttnResolutions.Length > 0)
            throw new NotSupportedException("tiled VAE: the official task queue has no per-level attention (attn_resolutions must be empty, as in SD)");
    }

    T M<T>(string path) where T : nn.Module => (T)_mods[_prefix + path];
    Func<Tensor, Tensor> Call(string path) { var m = M<nn.Module<Tensor, Tensor>>(path); return m.call; }

    void ResBlock(List<TaskItem> q, string path)
    {
        bool hasShortcut = _mods.ContainsKey(_prefix + path + ".nin_shortcut");
        q.Add(new TaskItem { Kind = Kind.StoreRes, Fn = hasShortcut ? Call(path + ".nin_shortcut") : (x => x) });
        q.Add(new TaskItem { Kind = Kind.PreNorm, Norm = M<GroupNorm>(path + ".norm1") });
        q.Add(new TaskItem { Kind = Kind.Silu });
        q.Add(new TaskItem { Kind = Kind.Conv, Fn = Call(path + ".conv1") });
        q.Add(new TaskItem { Kind = Kind.PreNorm, Norm = M<GroupNorm>(path + ".norm2") });
        q.Add(new TaskItem { Kind = Kind.Silu });
        q.Add(new TaskItem { Kind = Kind.Conv, Fn = Call(path + ".conv2") });
        q.Add(new TaskItem { Kind = Kind.AddRes });
    }

    void AttnBlock(List<TaskItem> q, string path)
    {
        var qc = M<Conv2d>(path + ".q"); var kc = M<Conv2d>(path + ".k"); var vc = M<Conv2d>(path + ".v");
        var po = M<Conv2d>(path + ".proj_out");
        q.Add(new TaskItem { Kind = Kind.StoreRes, Fn = x => x });
        q.Add(new TaskItem { Kind = Kind.PreNorm, Norm = M<GroupNorm>(path + ".norm") });
        q.Add(new TaskItem
        {
            Kind = Kind.Attn,
            Fn = h =>
            {
                // tilevae/attn.py forward (vanilla): the residual and norm are separate tasks.
                using var scope = torch.NewDisposeScope();
                var qq = qc.Run(h); var kk = kc.Run(h); var vv = vc.Run(h);
                long b = qq.shape[0], c = qq.shape[1], hh = qq.shape[2], ww = qq.shape[3];
                var qt = qq.reshape(b, c, hh * ww).permute(0, 2, 1);
                var w = torch.bmm(qt, kk.reshape(b, c, hh * ww)) * Math.Pow(c, -0.5);
                w = F.softmax(w, 2);
                var o = torch.bmm(vv.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww);
                return po.Run(o).MoveToOuterDisposeScope();
            },
        });
        q.Add(new TaskItem { Kind = Kind.AddRes });
    }

    /// <summary>The official <c>build_task_queue</c>: the network's forward as a flat list of tasks.</summary>
    List<TaskItem> BuildQueue()
    {
        var q = new List<TaskItem> { new() { Kind = Kind.ConvIn, Fn = Call("conv_in") } };
        if (_isDecoder)
        {
            ResBlock(q, "mid.block_1"); AttnBlock(q, "mid.attn_1"); ResBlock(q, "mid.block_2");
            for (int level = _numResolutions - 1; level >= 0; level--)
            {
                for (int b = 0; b < _numResBlocks + 1; b++) ResBlock(q, $"up.{level}.block.{b}");
                if (level != 0) q.Add(new TaskItem { Kind = Kind.Resample, Fn = Call($"up.{level}.upsample") });
            }
        }
        else
        {
            for (int level = 0; level < _numResolutions; level++)
            {
                for (int b = 0; b < _numResBlocks; b++) ResBlock(q, $"down.{level}.block.{b}");
                if (level != _numResolutions - 1) q.Add(new TaskItem { Kind = Kind.Resample, Fn = Call($"down.{level}.downsample") });
            }
            ResBlock(q, "mid.block_1"); AttnBlock(q, "mid.attn_1"); ResBlock(q, "mid.block_2");
        }
        if (_normOut) q.Add(new TaskItem { Kind = Kind.PreNorm, Norm = M<GroupNorm>("norm_out") });
        q.Add(new TaskItem { Kind = Kind.Silu });
        q.Add(new TaskItem { Kind = Kind.Conv, Fn = Call("conv_out") });
        return q;
    }

    /// <summary>Official <c>get_best_tile_size</c>: round up to a multiple of 32, 16, … 2 that still fits.</summary>
    static int BestTileSize(int lower, int upper)
    {
        for (int divider = 32; divider >= 2; divider /= 2)
        {
            int rem = lower % divider;
            if (rem == 0) return lower;
            int candidate = lower - rem + divider;
            if (candidate <= upper) return candidate;
        }
        return lower;
    }

    /// <summary>Boxes [x1, x2, y1, y2]: the padded input box and the output box of every tile (official <c>split_tiles</c>).</summary>
    public (List<int[]> Input, List<int[]> Output) SplitTiles(int h, int w)
    {
        int pad = Pad;
        int nh = Math.Max((int)Math.Ceiling((h - 2.0 * pad) / TileSize), 1);
        int nw = Math.Max((int)Math.Ceiling((w - 2.0 * pad) / TileSize), 1);
        int th = BestTileSize((int)Math.Ceiling((h - 2.0 * pad) / nh), TileSize);
        int tw = BestTileSize((int)Math.Ceiling((w - 2.0 * pad) / nw), TileSize);
        var inputs = new List<int[]>(); var outputs = new List<int[]>();
        for (int i = 0; i < nh; i++)
            for (int j = 0; j < nw; j++)
            {
                var box = new[] { pad + j * tw, Math.Min(pad + (j + 1) * tw, w), pad + i * th, Math.Min(pad + (i + 1) * th, h) };
                // boxes near the border extend to it (the border needs no context padding)
                var outBox = new[] { box[0] > pad ? box[0] : 0, box[1] < w - pad ? box[1] : w, box[2] > pad ? box[2] : 0, box[3] < h - pad ? box[3] : h };
                outputs.Add(outBox.Select(v => _isDecoder ? v * 8 : v / 8).ToArray());
                inputs.Add(new[] { Math.Max(0, box[0] - pad), Math.Min(w, box[1] + pad), Math.Max(0, box[2] - pad), Math.Min(h, box[3] + pad) });
            }
        return (inputs, outputs);
    }

    /// <summary>Whether the input is large enough to be tiled (official: max(H, W) &gt; 2·pad + tile_size).</summary>
    public bool WillTile(long h, long w) => Math.Max(h, w) > Pad * 2 + TileSize;

    /// <summary>Runs the encoder (image → moments) or decoder (post-quant latent → image), tiled when large enough.</summary>
    public Tensor Forward(Tensor x)
    {
        if (!WillTile(x.shape[2], x.shape[3])) return ((nn.Module<Tensor, Tensor>)_net).forward(x);
        return TileForward(x);
    }

    /// <summary>Per-group variance and mean of a tile over (channels in group, H, W), population variance (official <c>get_var_mean</c>).</summary>
    (Tensor Var, Tensor Mean) VarMean(Tensor tile)
    {
        long b = tile.shape[0], c = tile.shape[1];
        var r = tile.contiguous().view(1, b * _groups, c / _groups, tile.shape[2], tile.shape[3]);
        var (v, m) = torch.var_mean(r, new long[] { 0, 2, 3, 4 }, unbiased: false);
        return (v, m);
    }

    /// <summary>GroupNorm with given statistics (official <c>custom_group_norm</c>: batch_norm in eval mode, eps 1e-6, then the affine).</summary>
    Tensor CustomGroupNorm(Tensor x, Tensor mean, Tensor var, GroupNorm norm)
    {
        using var scope = torch.NewDisposeScope();
        long b = x.shape[0], c = x.shape[1];
        var r = x.contiguous().view(1, b * _groups, c / _groups, x.shape[2], x.shape[3]);
        var o = F.batch_norm(r, mean.to(x.dtype), var.to(x.dtype), null, null, training: false, momentum: 0, eps: 1e-6);
        o = o.view(b, c, x.shape[2], x.shape[3]);
        if (norm.weight is not null) o = o * norm.weight.view(1, -1, 1, 1);
        if (norm.bias is not null) o = o + norm.bias.view(1, -1, 1, 1);
        return o.MoveToOuterDisposeScope();
    }

    Tensor TileForward(Tensor z)
    {
        using var outer = torch.NewDisposeScope();
        z = z.detach();
        long n = z.shape[0];
        int height = (int)z.shape[2], width = (int)z.shape[3];
        var (inBoxes, outBoxes) = SplitTiles(height, width);
        var tiles = inBoxes.Select(bx => (Tensor?)z[.., .., bx[2]..bx[3], bx[0]..bx[1]].clone()).ToArray();
        int numTiles = tiles.Length;
        var single = BuildQueue();
        var queues = Enumerable.Range(0, numTiles).Select(_ => new LinkedList<TaskItem>(single.Select(t => t.Clone()))).ToArray();
        Tensor? result = null;
        int completed = 0;
        bool forward = true;
        while (true)
        {
            var vars = new List<Tensor>(); var means = new List<Tensor>(); var pixels = new List<long>();
            GroupNorm? normLayer = null;
            var order = forward ? Enumerable.Range(0, numTiles) : Enumerable.Range(0, numTiles).Reverse();
            foreach (int i in order.ToArray())
            {
                // Each tile's pass runs in its own scope; what survives it (the tile, pending residuals, statistics)
                // is moved out explicitly and the tile it replaces is freed, so memory stays at about one image.
                using var pass = torch.NewDisposeScope();
                var input = tiles[i]!;
                var tile = input;
                var queue = queues[i];
                while (queue.Count > 0)
                {
                    var task = queue.First!.Value;
                    queue.RemoveFirst();
                    if (task.Kind == Kind.PreNorm)
                    {
                        var (v, m) = VarMean(tile);
                        vars.Add(v.MoveToOuterDisposeScope()); means.Add(m.MoveToOuterDisposeScope()); pixels.Add(tile.shape[2] * tile.shape[3]);
                        normLayer = task.Norm;
                        break;
                    }
                    if (task.Kind == Kind.StoreRes)
                    {
                        var res = task.Fn!(tile);
                        if (ReferenceEquals(res, tile)) res = tile.clone();
                        queue.First(t => t.Kind == Kind.AddRes).Residual = res;
                    }
                    else if (task.Kind == Kind.AddRes)
                    {
                        tile = tile + task.Residual!;
                        task.Residual.Dispose();
                        task.Residual = null;
                    }
                    else if (task.Kind == Kind.Silu) tile = F.silu(tile);
                    else tile = task.Fn!(tile);
                }
                foreach (var t in queue) t.Residual?.MoveToOuterDisposeScope();
                if (queue.Count == 0)
                {
                    tiles[i] = null;
                    completed++;
                    if (result is null)
                        result = torch.zeros(new long[] { n, tile.shape[1], _isDecoder ? height * 8L : height / 8, _isDecoder ? width * 8L : width / 8 }, ScalarType.Float32, z.device).MoveToOuterDisposeScope();
                    var ob = outBoxes[i];
                    result[.., .., ob[2]..ob[3], ob[0]..ob[1]] = CropValid(tile, inBoxes[i], ob);
                }
                else
                {
                    if (i == numTiles - 1 && forward) forward = false;
                    else if (i == 0 && !forward) forward = true;
                    tiles[i] = ReferenceEquals(tile, input) ? input : tile.MoveToOuterDisposeScope();
                }
                if (!ReferenceEquals(tiles[i], input)) input.Dispose();
            }
            if (completed == numTiles) break;
            if (vars.Count > 0)
            {
                // Pixel-weighted average of the per-tile statistics (official GroupNormParam.summary).
                var v = torch.vstack(vars.ToArray()); var m = torch.vstack(means.ToArray());
                long maxPix = pixels.Max();
                var pix = torch.tensor(pixels.Select(p => (float)p).ToArray(), ScalarType.Float32, v.device) / maxPix;
                var sumPix = pix.sum();
                pix = pix.unsqueeze(1) / sumPix;
                var varS = (v * pix).sum(0L); var meanS = (m * pix).sum(0L);   // 0L: a literal 0 would bind to sum(ScalarType)
                var layer = normLayer!;
                Func<Tensor, Tensor> apply = x => CustomGroupNorm(x, meanS, varS, layer);
                foreach (var q in queues) q.AddFirst(new TaskItem { Kind = Kind.ApplyNorm, Fn = apply });
            }
        }
        return result!.to(z.dtype).MoveToOuterDisposeScope();
    }

    /// <summary>The tile's valid region: its padding, rescaled to the output, cut off (official <c>crop_valid_region</c>).</summary>
    Tensor CropValid(Tensor x, int[] inputBox, int[] targetBox)
    {
        var padded = inputBox.Select(v => _isDecoder ? v * 8 : v / 8).ToArray();
        var margin = Enumerable.Range(0, 4).Select(i => targetBox[i] - padded[i]).ToArray();
        long h = x.shape[2], w = x.shape[3];
        return x[.., .., margin[2]..(int)(h + margin[3]), margin[0]..(int)(w + margin[1])];
    }
}
