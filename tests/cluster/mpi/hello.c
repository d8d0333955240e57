/* The MPI test program of berth's MPI image (tests/cluster/mpi-image, tests/e2e/mpi.rs).
 * Every rank prints one line the tests parse:
 *   hello rank=R size=S host=H node=N sum=X expected=Y
 * R and S from MPI, H from gethostname, N from SLURMD_NODENAME (the Slurm node the task
 * runs on; on a one-machine multi-node cluster every node has the same hostname), and X the
 * MPI_Allreduce (MPI_SUM) of every rank's number, Y = S*(S-1)/2, the sum 0+1+...+(S-1) it
 * must give. Exit status 0 only when X == Y. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    int rank, size;
    long mine, sum = -1, expected;
    char host[256] = "";
    const char *node = getenv("SLURMD_NODENAME");

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host - 1);
    mine = rank;
    MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, MPI_COMM_WORLD);
    expected = (long)size * (size - 1) / 2;
    printf("hello rank=%d size=%d host=%s node=%s sum=%ld expected=%ld\n", rank, size, host,
           node ? node : "-", sum, expected);
    fflush(stdout);
    MPI_Finalize();
    return sum == expected ? 0 : 1;
}
