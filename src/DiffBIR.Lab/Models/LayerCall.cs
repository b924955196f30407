using TorchSharp;
using static TorchSharp.torch;

namespace DiffBIR.Lab.Models;

/// <summary>
/// How the models invoke their convolutions, linear layers and attention modules: <c>forward</c> in every normal run,
/// <c>call</c> (which runs forward hooks) only while a <see cref="Diagnostics.FlopCounter"/> counts on this thread.
/// TorchSharp runs hooks only through <c>call</c>, and switching the hot path to <c>call</c> for good was linked to
/// native crashes of the test process, so counting is opt-in per thread and a normal run never goes through <c>call</c>.
/// </summary>
public static class LayerCall
{
    [ThreadStatic] static int t_counting;

    /// <summary>True while a FLOP counter is active on this thread.</summary>
    public static bool Counting => t_counting > 0;

    /// <summary>Routes this thread's layer invocations through <c>call</c> until the result is disposed.</summary>
    internal static IDisposable BeginCounting()
    {
        t_counting++;
        return new End();
    }

    sealed class End : IDisposable
    {
        bool _done;
        public void Dispose() { if (!_done) { _done = true; t_counting--; } }
    }

    /// <summary>The layer on <paramref name="x"/>: <c>forward</c>, or <c>call</c> while counting.</summary>
    public static Tensor Run(this nn.Module<Tensor, Tensor> layer, Tensor x) => t_counting > 0 ? layer.call(x) : layer.forward(x);

    /// <summary>A two-input module (attention with a context or mask): <c>forward</c>, or <c>call</c> while counting.</summary>
    public static Tensor Run(this nn.Module<Tensor, Tensor?, Tensor> layer, Tensor x, Tensor? y) => t_counting > 0 ? layer.call(x, y) : layer.forward(x, y);
}
