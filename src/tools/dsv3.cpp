#include <cstdio>
int main() { std::puts("dsv3"); return 0; }
