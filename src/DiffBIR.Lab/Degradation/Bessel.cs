namespace DiffBIR.Lab.Degradation;

/// <summary>
/// Bessel function of the first kind, order one — the Cephes <c>j1</c> that <c>scipy.special.j1</c> calls, so the
/// circular low-pass (sinc) kernel agrees with the official numpy one to the last few ulps.
/// </summary>
/// <remarks>
/// Cephes (S. L. Moshier): on [0, 5] a rational approximation R(x²)/Q(x²) times x(x² − z₁)(x² − z₂), where z₁, z₂ are
/// the squares of the first two zeros of J1 (so those zeros are exact); above 5 the Hankel asymptotic form
/// √(2/(πx)) (P cos(x − 3π/4) − (5/x) Q sin(x − 3π/4)) with P, Q rational in (5/x)². Absolute error ≲ 2.6e−16 on [0, 30].
/// The coefficients are the published Cephes tables (j1.c).
/// </remarks>
public static class Bessel
{
    static readonly double[] RP = { -8.99971225705559398224E8, 4.52228297998194034323E11, -7.27494245221818276015E13, 3.68295732863852883286E15 };
    // Leading coefficient 1 is implicit (p1evl).
    static readonly double[] RQ =
    {
        6.20836478118054335476E2, 2.56987256757748830383E5, 8.35146791431949253037E7, 2.21511595479792499675E10,
        4.74914122079991414898E12, 7.84369607876235854894E14, 8.95222336184627338078E16, 5.32278620332680085395E18,
    };
    static readonly double[] PP =
    {
        7.62125616208173112003E-4, 7.31397056940917570436E-2, 1.12719608129684925192E0, 5.11207951146807644818E0,
        8.42404590141772420927E0, 5.21451598682361504063E0, 1.00000000000000000254E0,
    };
    static readonly double[] PQ =
    {
        5.71323128072548699714E-4, 6.88455908754495404082E-2, 1.10514232634061696926E0, 5.07386386128601488557E0,
        8.39985554327604159757E0, 5.20982848682361821619E0, 9.99999999999999997461E-1,
    };
    static readonly double[] QP =
    {
        5.10862594750176621635E-2, 4.98213872951233449420E0, 7.58238284132545283818E1, 3.66779609360150777800E2,
        7.10856304998926107277E2, 5.97489612400613639965E2, 2.11688757100572135698E2, 2.52070205858023719784E1,
    };
    // Leading coefficient 1 is implicit (p1evl).
    static readonly double[] QQ =
    {
        7.42373277035675149943E1, 1.05644886038262816351E3, 4.98641058337653607651E3, 9.56231892404756170795E3,
        7.99704160447350683650E3, 2.82619278517639096600E3, 3.36093607810698293419E2,
    };
    const double Z1 = 1.46819706421238932572E1;   // j_{1,1}²
    const double Z2 = 4.92184563216946036703E1;   // j_{1,2}²
    const double ThreePiOver4 = 2.35619449019234492885;
    const double SqrtTwoOverPi = 7.9788456080286535587989E-1;

    /// <summary>J₁(x); odd: J₁(−x) = −J₁(x).</summary>
    public static double J1(double x)
    {
        if (x < 0) return -J1(-x);
        if (double.IsNaN(x)) return double.NaN;
        if (x <= 5.0)
        {
            double z = x * x;
            double w = Polevl(z, RP) / P1evl(z, RQ);
            return w * x * (z - Z1) * (z - Z2);
        }
        if (double.IsPositiveInfinity(x)) return 0.0;
        {
            double w = 5.0 / x;
            double z = w * w;
            double p = Polevl(z, PP) / Polevl(z, PQ);
            double q = Polevl(z, QP) / P1evl(z, QQ);
            double xn = x - ThreePiOver4;
            p = p * Math.Cos(xn) - w * q * Math.Sin(xn);
            return p * SqrtTwoOverPi / Math.Sqrt(x);
        }
    }

    /// <summary>c₀xᴺ + … + c_N (Horner, in Cephes' order).</summary>
    static double Polevl(double x, double[] c)
    {
        double ans = c[0];
        for (int i = 1; i < c.Length; i++) ans = ans * x + c[i];
        return ans;
    }

    /// <summary>xᴺ + c₀xᴺ⁻¹ + … + c_{N−1} (leading 1 implicit).</summary>
    static double P1evl(double x, double[] c)
    {
        double ans = x + c[0];
        for (int i = 1; i < c.Length; i++) ans = ans * x + c[i];
        return ans;
    }
}
