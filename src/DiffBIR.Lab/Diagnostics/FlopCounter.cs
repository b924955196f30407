using DiffBIR.Lab.Models.Clip;
using DiffBIR.Lab.Models.StableDiffusion;
using DiffBIR.Lab.Models.Vae;
using TorchSharp;
using DiffBIR.Lab.Models;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Diagnostics;

/// <summary>What a counted multiply-add belongs to.</summary>
public enum FlopKind
{
    /// <summary>A <see cref="Conv2d"/>: output elements × (C_in / groups) × k_h × k_w.</summary>
    Convolution,
    /// <summary>A <see cref="Linear"/> (or CLIP's packed in-projection): output elements × in_features.</summary>
    Linear,
    /// <summary>The two attention products QKᵀ and A·V: 2 × batch × N_q × N_k × inner width (all heads).</summary>
    Attention,
}

/// <summary>One counted layer: how often it ran and its multiply-adds over all calls.</summary>
public sealed record FlopEntry(string Root, string Module, FlopKind Kind, long Calls, long Macs);

/// <summary>
/// The multiply-adds (MACs) of one or more forward passes; <see cref="Flops"/> = 2 × MACs. <see cref="NotCalled"/>
/// lists the countable layers under the roots that never ran — a layer invoked with <c>forward</c> instead of
/// <c>call</c> would be missed silently otherwise, so the tests require it to be empty for the full networks.
/// </summary>
public sealed record FlopReport(IReadOnlyList<FlopEntry> Entries, IReadOnlyList<string> NotCalled)
{
    public long Macs => Entries.Sum(e => e.Macs);
    public double Flops => 2.0 * Macs;
    public long MacsOf(FlopKind kind) => Entries.Where(e => e.Kind == kind).Sum(e => e.Macs);
    public long MacsOfRoot(string root) => Entries.Where(e => e.Root == root).Sum(e => e.Macs);
    public IEnumerable<string> Roots => Entries.Select(e => e.Root).Distinct();
}

/// <summary>
/// Counts the multiply-adds of our TorchSharp networks exactly, from the shapes each layer actually sees: forward hooks
/// on every <see cref="Conv2d"/>, <see cref="Linear"/> and attention module below the given roots
/// (<see cref="CrossAttention"/> of the UNet / ControlNet, the VAE's <see cref="AttnBlock"/>, CLIP's
/// <see cref="PackedSelfAttention"/>). TorchSharp runs hooks only through <c>call</c>; the models invoke these layers
/// through <see cref="LayerCall.Run(nn.Module{Tensor, Tensor}, Tensor)"/>, which uses <c>call</c> only while a counter
/// is alive on the same thread (create, run and dispose it on one thread) and plain <c>forward</c> otherwise, so normal
/// runs never take the hook path. Layers inside a <see cref="Sequential"/> are always invoked with <c>call</c> by
/// TorchSharp itself.
/// <para>Counted: convolutions (output elements × C_in/groups × k_h × k_w, padding included as a dense conv computes
/// it), linear layers (output elements × in_features), and the attention products QKᵀ and A·V (2 × B × N_q × N_k ×
/// heads·d_head, the full N_q × N_k even under CLIP's causal mask, as SDPA computes it). Not counted: biases,
/// normalisations, activations, softmax, the attention scale, resizing, concatenations and every other elementwise
/// operation; embeddings (table look-ups); the VAE middle attention's products when the tiled VAE runs (it
/// re-implements them with bmm; its convolutions are counted); the attention products of SwinIR and SCUNet, whose
/// layers also still run with <c>forward</c> (they show up in <see cref="FlopReport.NotCalled"/>).</para>
/// <para>It counts a real forward. To count a full-size network without allocating its weights, build it on the meta
/// device and use <see cref="NetworkFlops"/>, which gives the same entries from the module tree alone (the C++
/// libtorch has no meta kernels for convolutions, norms or SDPA, so a forward cannot run there).</para>
/// </summary>
public sealed class FlopCounter : IDisposable
{
    readonly Dictionary<(string Root, string Module, FlopKind Kind), (long Calls, long Macs)> _counts = new();
    readonly List<(string Root, string Module, FlopKind Kind)> _layers = new();
    readonly List<Action> _removers = new();
    readonly IDisposable _counting;

    /// <summary>Attaches counting hooks below each named root; they stay until <see cref="Dispose"/>.</summary>
    public FlopCounter(params (string Name, nn.Module Root)[] roots)
    {
        _counting = LayerCall.BeginCounting();
        foreach (var (rootName, root) in roots)
        {
            Attach(rootName, "", root);   // named_modules() leaves out the module itself
            foreach (var (name, m) in root.named_modules())
                Attach(rootName, name, m);
        }
    }

    /// <summary>Everything counted since construction (or the last <see cref="Reset"/>).</summary>
    public FlopReport Report()
    {
        var entries = _counts.Select(kv => new FlopEntry(kv.Key.Root, kv.Key.Module, kv.Key.Kind, kv.Value.Calls, kv.Value.Macs))
            .OrderBy(e => e.Root, StringComparer.Ordinal).ThenBy(e => e.Module, StringComparer.Ordinal).ToList();
        var notCalled = _layers.Where(l => !_counts.ContainsKey(l)).Select(l => $"{(l.Module == "" ? l.Root : l.Root + ":" + l.Module)} ({l.Kind})").ToList();
        return new FlopReport(entries, notCalled);
    }

    public void Reset() => _counts.Clear();

    public void Dispose()
    {
        foreach (var r in _removers) r();
        _removers.Clear();
        _counting.Dispose();
    }

    void Add(string root, string module, FlopKind kind, long macs)
    {
        var key = (root, module, kind);
        _counts[key] = _counts.TryGetValue(key, out var c) ? (c.Calls + 1, c.Macs + macs) : (1, macs);
    }

    void Watch(string root, string module, FlopKind kind) => _layers.Add((root, module, kind));

    void Attach(string root, string name, nn.Module m)
    {
        switch (m)
        {
            case Conv2d conv:
            {
                Watch(root, name, FlopKind.Convolution);
                var w = conv.weight!.shape;   // [C_out, C_in / groups, k_h, k_w]
                long perOutput = w[1] * w[2] * w[3];
                var h = conv.register_forward_hook((_, _, y) => { Add(root, name, FlopKind.Convolution, y.numel() * perOutput); return y; });
                _removers.Add(h.remove);
                break;
            }
            case Linear lin:
            {
                Watch(root, name, FlopKind.Linear);
                long inFeatures = lin.weight!.shape[1];
                var h = lin.register_forward_hook((_, _, y) => { Add(root, name, FlopKind.Linear, y.numel() * inFeatures); return y; });
                _removers.Add(h.remove);
                break;
            }
            case CrossAttention a:
            {
                Watch(root, name, FlopKind.Attention);
                long inner = (long)a.Heads * a.DimHead;
                var h = a.register_forward_hook((_, x, context, y) =>
                {
                    var c = context ?? x;   // self-attention when no context is given
                    Add(root, name, FlopKind.Attention, 2 * x.shape[0] * x.shape[1] * c.shape[1] * inner);
                    return y;
                });
                _removers.Add(h.remove);
                break;
            }
            case AttnBlock a:
            {
                Watch(root, name, FlopKind.Attention);
                var h = a.register_forward_hook((_, x, y) =>
                {
                    long b = x.shape[0], c = x.shape[1], n = x.shape[2] * x.shape[3];   // one head of width C over H·W tokens
                    Add(root, name, FlopKind.Attention, 2 * b * n * n * c);
                    return y;
                });
                _removers.Add(h.remove);
                break;
            }
            case PackedSelfAttention a:
            {
                // The packed in-projection is a functional linear (no Linear module), so it is counted here.
                Watch(root, name, FlopKind.Attention);
                Watch(root, name + ".in_proj", FlopKind.Linear);
                var h = a.register_forward_hook((_, x, _, y) =>
                {
                    long b = x.shape[0], l = x.shape[1], c = x.shape[2];
                    Add(root, name + ".in_proj", FlopKind.Linear, b * l * 3 * c * c);
                    Add(root, name, FlopKind.Attention, 2 * b * l * l * c);
                    return y;
                });
                _removers.Add(h.remove);
                break;
            }
            case Convolution other:
                // Only Conv2d is used by our networks; refuse rather than miss another kind silently.
                throw new NotSupportedException($"FlopCounter: {root}:{name} is a {other.GetType().Name}, which it does not count yet");
        }
    }
}
